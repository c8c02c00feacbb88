//! The rewriter against hand-made HTTP/2 bytes (HPACK written out field by
//! field, not by the codec under test), and a tonic server behind it
//! answering clients that send each `:authority` real clients send.

use std::path::Path;
use std::time::Duration;

use super::*;

/// A frame: header and payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let length = payload.len();
    out.extend_from_slice(&[(length >> 16) as u8, (length >> 8) as u8, length as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK string literal without Huffman coding (RFC 7541 §5.2), for
/// lengths under 127.
fn literal(text: &[u8]) -> Vec<u8> {
    assert!(text.len() < 127);
    let mut out = vec![text.len() as u8];
    out.extend_from_slice(text);
    out
}

/// A request's header block: `:method POST` (static 3), `:scheme http`
/// (static 6), `:path` with a literal value (name static 4), then
/// `:authority` (name static 1) as a literal added to the dynamic table.
fn first_request(authority: &[u8]) -> Vec<u8> {
    let mut block = vec![0x83, 0x86, 0x04];
    block.extend(literal(b"/v1beta1.DevicePlugin/Allocate"));
    block.push(0x41);
    block.extend(literal(authority));
    block.push(0x40);
    block.extend(literal(b"content-type"));
    block.extend(literal(b"application/grpc"));
    block
}

/// The next request on the same connection: every field from the tables
/// (the client's first dynamic entries are 62 = content-type, 63 =
/// :authority, newest first).
fn second_request() -> Vec<u8> {
    vec![0x83, 0x86, 0x84 /* :path / */, 0x80 | 63, 0x80 | 62]
}

/// Decodes every header block in `bytes` (after the preface) with a fresh
/// decoder, as the server would.
fn decoded_blocks(bytes: &[u8]) -> Vec<Vec<(String, String)>> {
    assert!(bytes.starts_with(PREFACE), "the preface goes on first");
    let mut rest = &bytes[PREFACE.len()..];
    let mut decoder = loona_hpack::Decoder::new();
    let mut blocks = Vec::new();
    let mut block = Vec::new();
    while !rest.is_empty() {
        let length = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let (kind, flags) = (rest[3], rest[4]);
        let payload = &rest[FRAME_HEADER..FRAME_HEADER + length];
        rest = &rest[FRAME_HEADER + length..];
        if kind == HEADERS || kind == CONTINUATION {
            assert!(length <= MAX_FRAME, "a frame over the initial maximum size");
            let start = if kind == HEADERS && flags & PRIORITY != 0 { 5 } else { 0 };
            assert_eq!(flags & PADDED, 0, "padding is not written");
            block.extend_from_slice(&payload[start..]);
            if flags & END_HEADERS != 0 {
                let headers = decoder.decode(&block).expect("the rewritten block decodes");
                blocks.push(
                    headers
                        .into_iter()
                        .map(|(n, v)| (String::from_utf8(n).expect("utf8"), String::from_utf8(v).expect("utf8")))
                        .collect(),
                );
                block.clear();
            }
        }
    }
    blocks
}

/// Each frame's type, flags and stream, after the preface.
fn frames(bytes: &[u8]) -> Vec<(u8, u8, u32)> {
    let mut rest = &bytes[PREFACE.len()..];
    let mut out = Vec::new();
    while !rest.is_empty() {
        let length = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        out.push((rest[3], rest[4], u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]])));
        rest = &rest[FRAME_HEADER + length..];
    }
    out
}

fn authority_of(block: &[(String, String)]) -> &str {
    block.iter().find(|(name, _)| name == ":authority").map(|(_, value)| value.as_str()).expect(":authority")
}

fn rewrite_all(input: &[u8], piece: usize) -> Vec<u8> {
    let mut rewriter = HeaderRewriter::new(Authority::Normalise);
    let mut out = Vec::new();
    for chunk in input.chunks(piece) {
        rewriter.push(chunk);
        out.extend_from_slice(&rewriter.output().split());
    }
    rewriter.finish();
    out.extend_from_slice(&rewriter.output().split());
    out
}

#[test]
fn a_percent_encoded_path_becomes_localhost_and_the_dynamic_table_stays_in_step() {
    let settings = frame(0x4, 0, 0, &[]);
    let data = frame(0x0, 0x1, 1, b"\0\0\0\0\x05hello");
    let mut input = PREFACE.to_vec();
    input.extend(&settings);
    input.extend(frame(HEADERS, END_HEADERS, 1, &first_request(b"%2Fvar%2Flib%2Fkubelet%2Fx-reg.sock")));
    input.extend(&data);
    input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &second_request()));

    // Whole, and byte by byte: the same output.
    let out = rewrite_all(&input, input.len());
    assert_eq!(rewrite_all(&input, 1), out);

    let blocks = decoded_blocks(&out);
    assert_eq!(blocks.len(), 2);
    assert_eq!(authority_of(&blocks[0]), "localhost");
    assert_eq!(authority_of(&blocks[1]), "localhost", "the client's dynamic entry was followed");
    assert!(blocks[1].contains(&(":path".into(), "/".into())));
    assert!(blocks[1].contains(&("content-type".into(), "application/grpc".into())));
    assert!(blocks[0].contains(&(":path".into(), "/v1beta1.DevicePlugin/Allocate".into())));
    // Other frames untouched and in order.
    let settings_at = PREFACE.len();
    assert_eq!(&out[settings_at..settings_at + settings.len()], &settings[..]);
    assert!(out.windows(data.len()).any(|window| window == data), "the DATA frame goes on as it came");
    // END_STREAM kept on the second HEADERS frame, not added to the first.
    let headers: Vec<(u8, u32)> = frames(&out)
        .into_iter()
        .filter(|&(kind, _, _)| kind == HEADERS)
        .map(|(_, flags, stream)| (flags, stream))
        .collect();
    assert_eq!(headers, [(END_HEADERS, 1), (END_HEADERS | END_STREAM, 3)]);
}

#[test]
fn every_authority_real_clients_send_is_made_acceptable_and_valid_ones_stay() {
    for (sent, served) in [
        (&b"%2Ftmp%2Fa.sock"[..], "localhost"),
        (b"/tmp/a.sock", "localhost"),
        (b"", "localhost"),
        (b"localhost", "localhost"),
        (b"example.com:8080", "example.com:8080"),
    ] {
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &first_request(sent)));
        let blocks = decoded_blocks(&rewrite_all(&input, 7));
        assert_eq!(authority_of(&blocks[0]), served, "sent {:?}", String::from_utf8_lossy(sent));
        assert!(http::uri::Authority::try_from(served).is_ok());
    }
}

#[test]
fn padding_priority_and_continuation_frames_are_understood() {
    let block = first_request(b"%2Fa");
    let (head, tail) = block.split_at(5);
    // HEADERS with 3 bytes of padding and priority fields, then a CONTINUATION.
    let mut payload = vec![3];
    payload.extend_from_slice(&[0x80, 0, 0, 0, 0x10]);
    payload.extend_from_slice(head);
    payload.extend_from_slice(&[0, 0, 0]);
    let mut input = PREFACE.to_vec();
    input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 1, &payload));
    input.extend(frame(CONTINUATION, END_HEADERS, 1, tail));
    let out = rewrite_all(&input, 3);
    let blocks = decoded_blocks(&out);
    assert_eq!(authority_of(&blocks[0]), "localhost");
    let first = &out[PREFACE.len()..];
    assert_eq!(first[4], END_STREAM | PRIORITY | END_HEADERS, "flags kept, padding dropped, one frame");
    assert_eq!(&first[FRAME_HEADER..FRAME_HEADER + 5], &[0x80, 0, 0, 0, 0x10], "priority fields kept");
}

#[test]
fn a_block_larger_than_a_frame_is_split_into_continuations() {
    let mut block = first_request(b"%2Fa");
    // 200 custom headers of ~100 bytes each, literal without indexing.
    for i in 0..200 {
        block.push(0x00);
        block.extend(literal(format!("x-header-{i:03}").as_bytes()));
        block.extend(literal(&[b'v'; 100]));
    }
    let mut input = PREFACE.to_vec();
    for (i, chunk) in block.chunks(MAX_FRAME).enumerate() {
        let last = (i + 1) * MAX_FRAME >= block.len();
        input.extend(frame(if i == 0 { HEADERS } else { CONTINUATION }, if last { END_HEADERS } else { 0 }, 1, chunk));
    }
    let blocks = decoded_blocks(&rewrite_all(&input, 1000));
    assert_eq!(blocks[0].len(), 5 + 200);
    assert_eq!(authority_of(&blocks[0]), "localhost");
}

#[test]
fn what_is_not_http2_as_expected_goes_on_as_it_came() {
    let http1 = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    assert_eq!(rewrite_all(&http1, 4), http1);

    // A header block interrupted by another frame.
    let mut broken = PREFACE.to_vec();
    broken.extend(frame(HEADERS, 0, 1, &first_request(b"%2Fa")));
    broken.extend(frame(0x0, 0, 1, b"data"));
    assert_eq!(rewrite_all(&broken, 5), broken);

    // A block that is not HPACK (an index past both tables).
    let mut garbage = PREFACE.to_vec();
    garbage.extend(frame(HEADERS, END_HEADERS, 1, &[0xff, 0x7f]));
    garbage.extend(frame(0x4, 0, 0, &[]));
    assert_eq!(rewrite_all(&garbage, 3), garbage);

    // A header frame larger than any peer allows: not held.
    let mut huge = PREFACE.to_vec();
    huge.extend(frame(HEADERS, END_HEADERS, 1, &vec![0x82; MAX_FRAME + 1]));
    let mut rewriter = HeaderRewriter::new(Authority::Normalise);
    rewriter.push(&huge[..PREFACE.len() + FRAME_HEADER + 10]);
    assert!(rewriter.passing_through(), "decided on the frame header alone");

    // Cut short: what was held goes on at the end.
    let mut cut = PREFACE.to_vec();
    cut.extend(&frame(HEADERS, END_HEADERS, 1, &first_request(b"%2Fa"))[..12]);
    assert_eq!(rewrite_all(&cut, 2), cut);
}

/// An attacker's blocks: one that grows past [`MAX_BLOCK`] over many
/// CONTINUATION frames is not held whole, and a small one that decodes to
/// over a gigabyte (one byte a reference to a 4 KiB table entry) is not
/// decoded into memory: both go on as they came, for the server to refuse.
#[test]
fn blocks_built_to_exhaust_memory_are_passed_on_not_held() {
    // 300 KiB of CONTINUATION frames, never ending the block.
    let mut endless = PREFACE.to_vec();
    endless.extend(frame(HEADERS, 0, 1, &[0x82; 1000]));
    for _ in 0..300 {
        endless.extend(frame(CONTINUATION, 0, 1, &[0x82; 1024]));
    }
    let mut rewriter = HeaderRewriter::new(Authority::Normalise);
    let mut out = Vec::new();
    for chunk in endless.chunks(4096) {
        rewriter.push(chunk);
        out.extend_from_slice(&rewriter.output().split());
        assert!(rewriter.pending.as_ref().is_none_or(|p| p.block.len() <= MAX_BLOCK), "held past the bound");
    }
    assert!(rewriter.passing_through());
    assert_eq!(out, endless, "passed on as it came");

    // A 4,000-byte value added to the table, then 250,000 one-byte
    // references to it: a 244 KiB block that decodes to about 1 GB.
    let mut bomb = vec![0x40];
    bomb.extend([0x01, b'x']);
    bomb.push(0x7f); // value length 4000: 127 + varint
    let mut rest = 4000 - 127;
    while rest >= 128 {
        bomb.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    bomb.push(rest as u8);
    bomb.extend(std::iter::repeat_n(b'v', 4000));
    bomb.extend(std::iter::repeat_n(0x80 | 62, 250_000));
    let mut input = PREFACE.to_vec();
    for (i, chunk) in bomb.chunks(MAX_FRAME).enumerate() {
        let last = (i + 1) * MAX_FRAME >= bomb.len();
        input.extend(frame(if i == 0 { HEADERS } else { CONTINUATION }, if last { END_HEADERS } else { 0 }, 1, chunk));
    }
    assert!(bomb.len() <= MAX_BLOCK, "the encoded block itself is within bounds");
    assert_eq!(rewrite_all(&input, 65_536), input, "passed on as it came, not decoded into 1 GB");
}

/// A gRPC server behind [`crate::sockets::unix_incoming`] answers clients
/// sending each authority real clients send; the same server without it
/// refuses the percent-encoded path (the bug this module exists for).
#[tokio::test]
async fn a_tonic_server_behind_the_rewriter_answers_every_client() {
    use crate::proto::v1beta1::registration_client::RegistrationClient;
    use crate::proto::v1beta1::registration_server::{Registration, RegistrationServer};
    use crate::proto::v1beta1::{Empty, RegisterRequest};

    struct Accepting;
    #[tonic::async_trait]
    impl Registration for Accepting {
        async fn register(
            &self,
            _request: tonic::Request<RegisterRequest>,
        ) -> Result<tonic::Response<Empty>, tonic::Status> {
            Ok(tonic::Response::new(Empty {}))
        }
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let serve = |name: &str, rewrite: bool| {
        let path = dir.path().join(name);
        let (listener, _) = crate::sockets::bind(&path).expect("bind");
        let server = tonic::transport::Server::builder().add_service(RegistrationServer::new(Accepting));
        if rewrite {
            let incoming = crate::sockets::unix_incoming(listener, name.to_owned(), Default::default());
            tokio::spawn(server.serve_with_incoming(incoming));
        } else {
            tokio::spawn(server.serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)));
        }
        path
    };
    let fixed = serve("fixed.sock", true);
    let bare = serve("bare.sock", false);

    async fn call(path: &Path, authority: Option<&[u8]>) -> Result<(), tonic::Status> {
        let timeout = Duration::from_secs(10);
        let channel = match authority {
            Some(authority) => crate::sockets::client::connect_as(path, timeout, authority).await,
            None => crate::sockets::client::connect(path, timeout).await,
        }
        .expect("connect");
        let mut client = RegistrationClient::new(channel);
        for _ in 0..3 {
            // Several calls on one connection: the dynamic tables stay in step.
            client.register(RegisterRequest::default()).await?;
        }
        Ok(())
    }

    let encoded = crate::sockets::client::plugin_watcher_authority(&fixed);
    for authority in [Some(&encoded[..]), Some(fixed.as_os_str().as_encoded_bytes()), Some(b""), None] {
        call(&fixed, authority).await.unwrap_or_else(|status| panic!("{authority:?}: {status}"));
    }
    let refused = call(&bare, Some(&crate::sockets::client::plugin_watcher_authority(&bare)))
        .await
        .expect_err("h2 alone refuses a percent-encoded path");
    assert!(format!("{refused:?}").contains("PROTOCOL_ERROR"), "{refused:?}");
    call(&bare, None).await.expect("h2 alone accepts localhost");
}
