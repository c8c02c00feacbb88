//! `v1beta1.ListAndWatchResponse` (`repeated Device devices = 1;`), written
//! by hand instead of generated (`build.rs` maps the message here), so that
//! a device list can be encoded once per change and the same bytes sent on
//! every stream. The generated type would be cloned and encoded again for
//! each stream and message: for 10,000 devices, tens of thousands of
//! allocations each time. Its encoding is the generated one's, byte for
//! byte (see the tests), and it decodes the same way.

use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{DecodeContext, WireType, message, skip_field};

use super::v1beta1::Device;

/// The message of every `ListAndWatch` stream: the whole device list.
#[derive(Clone, Default, PartialEq)]
pub struct ListAndWatchResponse {
    /// The devices, as built to be sent or as received. Empty in a message
    /// made by [`ListAndWatchResponse::pre_encoded`], which keeps only
    /// their encoding.
    pub devices: Vec<Device>,
    /// The encoding of the devices, made once: sent as it is.
    encoded: Option<Bytes>,
}

impl ListAndWatchResponse {
    /// A message of `devices`, encoded when it is sent.
    pub fn new(devices: Vec<Device>) -> Self {
        ListAndWatchResponse { devices, encoded: None }
    }

    /// The encoding of this message's devices, made now.
    pub fn encode_devices(&self) -> Bytes {
        let mut buf = Vec::with_capacity(prost::Message::encoded_len(self));
        message::encode_repeated(DEVICES, &self.devices, &mut buf);
        Bytes::from(buf)
    }

    /// A message that sends `encoded` (from [`Self::encode_devices`]) as
    /// it is; cloning it shares the bytes. Its `devices` field is empty.
    pub fn pre_encoded(encoded: Bytes) -> Self {
        ListAndWatchResponse { devices: Vec::new(), encoded: Some(encoded) }
    }
}

/// The field number of `devices`.
const DEVICES: u32 = 1;

impl prost::Message for ListAndWatchResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        match &self.encoded {
            Some(encoded) => buf.put_slice(encoded),
            None => message::encode_repeated(DEVICES, &self.devices, buf),
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        if tag == DEVICES {
            message::merge_repeated(wire_type, &mut self.devices, buf, ctx).map_err(|mut error| {
                error.push("ListAndWatchResponse", "devices");
                error
            })
        } else {
            skip_field(wire_type, tag, buf, ctx)
        }
    }

    fn encoded_len(&self) -> usize {
        match &self.encoded {
            Some(encoded) => encoded.len(),
            None => message::encoded_len_repeated(DEVICES, &self.devices),
        }
    }

    fn clear(&mut self) {
        self.devices.clear();
        self.encoded = None;
    }
}

impl std::fmt::Debug for ListAndWatchResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = f.debug_struct("ListAndWatchResponse");
        out.field("devices", &self.devices);
        if let Some(encoded) = &self.encoded {
            out.field("encoded_bytes", &encoded.len());
        }
        out.finish()
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::proto::v1beta1::{NumaNode, TopologyInfo};

    fn devices() -> Vec<Device> {
        vec![
            Device { id: "gpu-0".into(), health: "Healthy".into(), topology: None },
            Device {
                id: "gpu-1".into(),
                health: "Unhealthy".into(),
                topology: Some(TopologyInfo { nodes: vec![NumaNode { id: 0 }, NumaNode { id: 1 }] }),
            },
        ]
    }

    /// What protoc would write for `repeated Device devices = 1`, by hand:
    /// each device as field 1, wire type 2 (0x0a), its length, its fields.
    #[test]
    fn the_encoding_is_the_protobuf_one_and_pre_encoding_changes_nothing() {
        let message = ListAndWatchResponse::new(devices());
        let bytes = message.encode_to_vec();
        let first = [&[0x0a, 16, 0x0a, 5][..], b"gpu-0", &[0x12, 7], b"Healthy"].concat();
        assert_eq!(&bytes[..first.len()], first.as_slice());
        let shared = ListAndWatchResponse::pre_encoded(message.encode_devices());
        assert_eq!(shared.encode_to_vec(), bytes, "the same bytes on the wire");
        assert_eq!(shared.encoded_len(), bytes.len());
        let decoded = ListAndWatchResponse::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(decoded, ListAndWatchResponse::new(devices()));
    }

    #[test]
    fn unknown_fields_are_skipped_and_bad_ones_refused() {
        let mut bytes = ListAndWatchResponse::new(devices()).encode_to_vec();
        bytes.extend([0x10, 0x07]); // field 2, varint 7: not in the message
        assert_eq!(ListAndWatchResponse::decode(bytes.as_slice()).expect("decodes").devices, devices());
        assert!(ListAndWatchResponse::decode(&[0x0a, 0x05, 0x0a][..]).is_err(), "a cut device is an error");
    }
}
