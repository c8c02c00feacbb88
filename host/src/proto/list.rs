//! `v1beta1.ListAndWatchResponse` (`repeated Device devices = 1;`), written
//! by hand instead of generated (`build.rs` maps the message here), so that
//! a device list can be encoded once per change and the same bytes sent on
//! every stream. The generated type would be cloned and encoded again for
//! each stream and message: for 10,000 devices, tens of thousands of
//! allocations each time. Its encoding is the generated one's, byte for
//! byte (see the tests), and it decodes the same way.
//!
//! [`encode_device`] writes one element of that list straight from a
//! device's parts, so a new state is encoded without first building a
//! generated `Device` (two strings and a topology) per device.

use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{
    DecodeContext, WireType, encode_key, encode_varint, encoded_len_varint, key_len, message, skip_field,
};

use super::v1beta1::{Device, NumaNode};

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

    /// A message that sends `encoded` (devices appended by
    /// [`encode_device`]) as it is; cloning it shares the bytes. Its
    /// `devices` field is empty.
    pub fn pre_encoded(encoded: Bytes) -> Self {
        ListAndWatchResponse { devices: Vec::new(), encoded: Some(encoded) }
    }
}

/// The field number of `devices`.
const DEVICES: u32 = 1;
/// `Device`'s fields: `ID`, `health`, `topology`; `TopologyInfo.nodes`.
const DEVICE_ID: u32 = 1;
const DEVICE_HEALTH: u32 = 2;
const DEVICE_TOPOLOGY: u32 = 3;
const TOPOLOGY_NODES: u32 = 1;

/// Appends one device to an encoded `devices` list (the bytes
/// [`ListAndWatchResponse::pre_encoded`] takes): exactly what the generated
/// `Device { id, health, topology }` encodes to, where `topology` is set
/// only when `numa_nodes` is not empty.
pub fn encode_device(id: &str, health: &str, numa_nodes: &[i64], buf: &mut Vec<u8>) {
    let nodes_len: usize = numa_nodes.iter().map(|&id| message::encoded_len(TOPOLOGY_NODES, &NumaNode { id })).sum();
    let topology_len = if numa_nodes.is_empty() {
        0
    } else {
        key_len(DEVICE_TOPOLOGY) + encoded_len_varint(nodes_len as u64) + nodes_len
    };
    let body = string_len(DEVICE_ID, id) + string_len(DEVICE_HEALTH, health) + topology_len;
    encode_key(DEVICES, WireType::LengthDelimited, buf);
    encode_varint(body as u64, buf);
    put_string(DEVICE_ID, id, buf);
    put_string(DEVICE_HEALTH, health, buf);
    if !numa_nodes.is_empty() {
        encode_key(DEVICE_TOPOLOGY, WireType::LengthDelimited, buf);
        encode_varint(nodes_len as u64, buf);
        for &id in numa_nodes {
            message::encode(TOPOLOGY_NODES, &NumaNode { id }, buf);
        }
    }
}

/// A proto3 string field's encoded length (an empty one is not written).
fn string_len(tag: u32, value: &str) -> usize {
    if value.is_empty() { 0 } else { key_len(tag) + encoded_len_varint(value.len() as u64) + value.len() }
}

fn put_string(tag: u32, value: &str, buf: &mut Vec<u8>) {
    if !value.is_empty() {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(value.len() as u64, buf);
        buf.put_slice(value.as_bytes());
    }
}

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
    use crate::proto::v1beta1::TopologyInfo;

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
        let shared = ListAndWatchResponse::pre_encoded(Bytes::from(bytes.clone()));
        assert_eq!(shared.encode_to_vec(), bytes, "the same bytes on the wire");
        assert_eq!(shared.encoded_len(), bytes.len());
        let decoded = ListAndWatchResponse::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(decoded, ListAndWatchResponse::new(devices()));
    }

    /// Byte for byte what the generated `Device` encodes to, for IDs and
    /// NUMA IDs whose lengths cross a varint boundary, NUMA node 0 (an
    /// empty message) and a negative one (ten bytes).
    #[test]
    fn a_device_encoded_from_its_parts_is_the_generated_encoding() {
        let long = "d".repeat(200);
        let cases: [(&str, &str, &[i64]); 5] = [
            ("gpu-0", "Healthy", &[]),
            ("gpu-1", "Unhealthy", &[0]),
            (&long, "Healthy", &[1, 0, 300]),
            ("x", "Unhealthy", &[-1]),
            (&long[..127], "Healthy", &[7; 20]),
        ];
        let mut parts = Vec::new();
        let mut generated = Vec::new();
        for (id, health, numa) in cases {
            encode_device(id, health, numa, &mut parts);
            generated.push(Device {
                id: id.to_owned(),
                health: health.to_owned(),
                topology: (!numa.is_empty())
                    .then(|| TopologyInfo { nodes: numa.iter().map(|&id| NumaNode { id }).collect() }),
            });
        }
        assert_eq!(parts, ListAndWatchResponse::new(generated.clone()).encode_to_vec());
        let decoded = ListAndWatchResponse::decode(parts.as_slice()).expect("decodes");
        assert_eq!(decoded.devices, generated);
    }

    #[test]
    fn unknown_fields_are_skipped_and_bad_ones_refused() {
        let mut bytes = ListAndWatchResponse::new(devices()).encode_to_vec();
        bytes.extend([0x10, 0x07]); // field 2, varint 7: not in the message
        assert_eq!(ListAndWatchResponse::decode(bytes.as_slice()).expect("decodes").devices, devices());
        assert!(ListAndWatchResponse::decode(&[0x0a, 0x05, 0x0a][..]).is_err(), "a cut device is an error");
    }
}
