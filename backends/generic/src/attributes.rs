//! What a device says about itself (ABI 1.1): the DRA attributes published
//! with every device, from what a scan found ([`Seen`]).
//!
//! The host refuses a whole device list when one attribute breaks DRA's
//! rules (qualified names, string values of at most 64 bytes), so a value
//! that would break one is left out and comes back as a warning, which the
//! backend logs once. Nothing is cut: a cut path or serial number would
//! name another device. Paths past 64 bytes are real (`/dev/serial/by-id/…`
//! names often are).

use std::collections::BTreeMap;

use devhost_abi::sdk::AttributeValue;

use crate::scan::Seen;

/// `string`: the device's path as the pattern names it (`/dev/ttyUSB0`);
/// for a device of several paths, the first in sorted order.
pub const PATH: &str = "generic.devhost.io/path";
/// `string`: the USB vendor ID, four hex digits as sysfs writes them
/// (`0403`).
pub const USB_VENDOR: &str = "generic.devhost.io/usbVendor";
/// `string`: the USB product ID (`6001`).
pub const USB_PRODUCT: &str = "generic.devhost.io/usbProduct";
/// `string`: the USB device's own serial number; absent when it has none
/// (the ID then uses the port, which is not a serial number).
pub const USB_SERIAL: &str = "generic.devhost.io/usbSerial";

/// DRA's limit on a string value, in bytes.
pub const MAX_VALUE: usize = 64;

/// The attributes of device `id`, and one warning per value left out.
pub fn describe(id: &str, seen: &Seen) -> (BTreeMap<String, AttributeValue>, Vec<String>) {
    let mut attributes = BTreeMap::new();
    let mut warnings = Vec::new();
    let mut string = |name: &str, value: &str| {
        if value.len() > MAX_VALUE {
            warnings.push(format!(
                "device {id}: attribute {name} left out: {value:?} is {} bytes, DRA allows {MAX_VALUE}",
                value.len()
            ));
        } else if !value.is_empty() {
            attributes.insert(name.to_owned(), AttributeValue::String(value.to_owned()));
        }
    };
    if let Some(path) = seen.paths.first() {
        string(PATH, &path.to_string_lossy());
    }
    if let Some(usb) = &seen.usb {
        string(USB_VENDOR, &usb.vendor);
        string(USB_PRODUCT, &usb.product);
        if usb.has_serial {
            string(USB_SERIAL, &usb.serial);
        }
    }
    (attributes, warnings)
}
