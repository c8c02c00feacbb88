//! The `:authority` real gRPC clients send on a Unix socket, made acceptable
//! to the HTTP/2 server under tonic.
//!
//! A Unix socket has no host name, and clients disagree on what to send:
//! grpc-go with a bare socket path as its target (the kubelet's plugin
//! watcher) and gRPC C-core from 1.57 (Python's `grpcio`) send the
//! percent-encoded path (`%2Fvar%2Flib%2F…`), grpc-java the raw path, some
//! clients an empty value, the kubelet's device manager and DRA client
//! `localhost`. The `h2` crate refuses every request whose `:authority` is
//! not a valid URI authority with `RST_STREAM(PROTOCOL_ERROR)`, before the
//! service sees it, and offers no switch for it.
//!
//! [`Rewritten`] sits between the socket and the HTTP/2 server and rewrites
//! the header blocks on their way in: an `:authority` that `http` would
//! refuse becomes `localhost` (what the kubelet's own clients send), every
//! other header is kept as sent. HPACK is stateful (a header block refers
//! to the entries earlier blocks added to a dynamic table), so every block
//! of the connection is decoded with the client's table and encoded again
//! for the server with a table of its own (the `loona-hpack` codec); every
//! other frame is passed on untouched. A connection whose first request's
//! `:authority` the server accepts as sent (the kubelet's `localhost`) is
//! passed on untouched from that block on: a gRPC channel sends one value
//! throughout, and re-coding every block cost more instructions than a bare
//! server's whole `Allocate`. The same machinery, on the write side
//! of a client, lets the fake kubelet send exactly what the real plugin
//! watcher sends ([`Authority::SendAs`]).
//!
//! Anything that is not HTTP/2 as RFC 9113 frames it (no preface, a header
//! block interleaved with other frames, an undecodable block, a block over
//! [`MAX_BLOCK`]) is passed on as it came, from there to the end of the
//! connection: the server then refuses it exactly as it would have. What
//! one connection can make the rewriter hold is bounded twice: the encoded
//! block ([`MAX_BLOCK`]) and the header list it decodes to ([`MAX_DECODED`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The connection preface every HTTP/2 client sends first.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A frame header: 24-bit length, type, flags, 31-bit stream ID.
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The largest frame every HTTP/2 peer accepts (the initial
/// `SETTINGS_MAX_FRAME_SIZE`): header frames are written no larger.
const MAX_FRAME: usize = 16_384;
/// The largest header block (as encoded, across its frames) that is held
/// to be rewritten. The server under tonic refuses header lists over 16 KiB
/// anyway; this bounds the memory a hostile client can make a connection
/// hold before that.
pub const MAX_BLOCK: usize = 256 * 1024;
/// The largest header list (decoded, counted as HPACK counts it: name,
/// value and 32 bytes an entry) that is rewritten. A small block can decode
/// to far more (one byte refers to a 4 KiB table entry): past this the
/// block is passed on as it came, and the server, which accepts 16 KiB,
/// refuses it as it would have. Bounds what one connection can make the
/// rewriter allocate.
pub const MAX_DECODED: usize = 1024 * 1024;
/// The HPACK dynamic table size both ends of a connection start with
/// (`SETTINGS_HEADER_TABLE_SIZE`'s initial value). devhost's servers never
/// announce another, so the client's encoder uses at most this, and the
/// encoder here must too.
const TABLE_SIZE: usize = 4096;

/// The `:authority` the kubelet's own clients send on a Unix socket.
pub const LOCALHOST: &[u8] = b"localhost";

/// What happens to the `:authority` of each request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authority {
    /// A value the HTTP/2 server would refuse becomes [`LOCALHOST`]; a valid
    /// one stays (the server side).
    Normalise,
    /// Every value becomes this one, valid or not (a test client copying
    /// what a real client sends).
    SendAs(Vec<u8>),
}

impl Authority {
    fn rewrite(&self, value: &[u8]) -> Option<&[u8]> {
        match self {
            Authority::Normalise => http::uri::Authority::try_from(value).is_err().then_some(LOCALHOST),
            Authority::SendAs(sent) => Some(sent),
        }
    }
}

/// Where the rewriter is in the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    /// Before the connection preface.
    Preface,
    /// At the start of a frame.
    FrameStart,
    /// Inside the payload of a frame passed on untouched: this many bytes
    /// are left.
    Forwarding(usize),
    /// Not HTTP/2 as expected: everything is passed on as it comes.
    Passthrough,
}

/// A header block being collected from a HEADERS frame and its
/// CONTINUATION frames.
struct PendingBlock {
    stream: u32,
    /// END_STREAM of the HEADERS frame.
    end_stream: bool,
    /// The HEADERS frame's priority fields, if it had them.
    priority: Option<[u8; 5]>,
    /// The block's fragments, padding removed.
    block: Vec<u8>,
    /// The frames as they came, to be passed on if the block cannot be
    /// rewritten.
    raw: Vec<u8>,
}

/// Rewrites the header blocks in one direction of one HTTP/2 connection:
/// bytes go in with [`HeaderRewriter::push`] in any pieces, and come out
/// rewritten, in order, from [`HeaderRewriter::output`].
pub struct HeaderRewriter {
    authority: Authority,
    position: Position,
    input: BytesMut,
    output: BytesMut,
    pending: Option<PendingBlock>,
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
    /// Header blocks whose `:authority` was changed.
    rewritten: u64,
    /// No header block has been passed on yet: the server's HPACK table is
    /// still the client's (both empty).
    first_block: bool,
}

impl std::fmt::Debug for HeaderRewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeaderRewriter")
            .field("authority", &self.authority)
            .field("position", &self.position)
            .field("rewritten", &self.rewritten)
            .finish_non_exhaustive()
    }
}

impl HeaderRewriter {
    /// A rewriter for the bytes a client sends, from the connection's first.
    pub fn new(authority: Authority) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        // The client may not grow its table past what the server allows.
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        let mut encoder = loona_hpack::Encoder::new();
        encoder.set_max_table_size(TABLE_SIZE);
        HeaderRewriter {
            authority,
            position: Position::Preface,
            input: BytesMut::new(),
            output: BytesMut::new(),
            pending: None,
            decoder,
            encoder,
            rewritten: 0,
            first_block: true,
        }
    }

    /// Header blocks whose `:authority` this rewriter has changed.
    pub fn rewritten(&self) -> u64 {
        self.rewritten
    }

    /// Whether the rewriter has given up on the stream and passes it on as
    /// it comes.
    pub fn passing_through(&self) -> bool {
        self.position == Position::Passthrough
    }

    /// Takes `bytes` in and rewrites what can be rewritten so far.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.position == Position::Passthrough && self.input.is_empty() {
            self.output.extend_from_slice(bytes);
            return;
        }
        self.input.extend_from_slice(bytes);
        self.process();
    }

    /// The bytes ready to go on, in order.
    pub fn output(&mut self) -> &mut BytesMut {
        &mut self.output
    }

    /// The stream ended: whatever is held (a frame cut short) goes on as it
    /// came, for the receiver to refuse.
    pub fn finish(&mut self) {
        if let Some(pending) = self.pending.take() {
            self.output.extend_from_slice(&pending.raw);
        }
        let rest = self.input.split();
        self.output.extend_from_slice(&rest);
        self.position = Position::Passthrough;
    }

    fn process(&mut self) {
        loop {
            match self.position {
                Position::Passthrough => {
                    let rest = self.input.split();
                    self.output.extend_from_slice(&rest);
                    return;
                }
                Position::Preface => {
                    let seen = self.input.len().min(PREFACE.len());
                    if self.input[..seen] != PREFACE[..seen] {
                        self.give_up();
                    } else if seen < PREFACE.len() {
                        return;
                    } else {
                        let preface = self.input.split_to(PREFACE.len());
                        self.output.extend_from_slice(&preface);
                        self.position = Position::FrameStart;
                    }
                }
                Position::Forwarding(left) => {
                    if self.input.is_empty() {
                        return;
                    }
                    let take = left.min(self.input.len());
                    let bytes = self.input.split_to(take);
                    self.output.extend_from_slice(&bytes);
                    self.position = if take == left { Position::FrameStart } else { Position::Forwarding(left - take) };
                }
                Position::FrameStart => {
                    if self.input.len() < FRAME_HEADER {
                        return;
                    }
                    let length =
                        usize::from(self.input[0]) << 16 | usize::from(self.input[1]) << 8 | usize::from(self.input[2]);
                    let kind = self.input[3];
                    if kind != HEADERS && kind != CONTINUATION {
                        if self.pending.is_some() {
                            // A header block must not be interrupted (RFC 9113 §6.10).
                            self.give_up();
                            continue;
                        }
                        let header = self.input.split_to(FRAME_HEADER);
                        self.output.extend_from_slice(&header);
                        self.position = if length == 0 { Position::FrameStart } else { Position::Forwarding(length) };
                        continue;
                    }
                    let held = self.pending.as_ref().map_or(0, |pending| pending.block.len());
                    if length > MAX_FRAME || held + length > MAX_BLOCK {
                        self.give_up();
                        continue;
                    }
                    if self.input.len() < FRAME_HEADER + length {
                        return;
                    }
                    let frame = self.input.split_to(FRAME_HEADER + length);
                    if self.header_frame(&frame).is_err() {
                        // Put the frame back so that it goes on as it came.
                        let rest = self.input.split();
                        self.input.extend_from_slice(&frame);
                        self.input.extend_from_slice(&rest);
                        self.give_up();
                    }
                }
            }
        }
    }

    /// Takes one HEADERS or CONTINUATION frame (header included); at the end
    /// of a block, writes the block out rewritten. `Err` if the frame breaks
    /// the framing rules or the block cannot be decoded.
    fn header_frame(&mut self, frame: &[u8]) -> Result<(), ()> {
        let kind = frame[3];
        let flags = frame[4];
        let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let payload = &frame[FRAME_HEADER..];
        if kind == HEADERS {
            if self.pending.is_some() || stream == 0 {
                return Err(());
            }
            let mut fragment = payload;
            let mut padding = 0;
            if flags & PADDED != 0 {
                let (&length, rest) = fragment.split_first().ok_or(())?;
                padding = usize::from(length);
                fragment = rest;
            }
            let mut priority = None;
            if flags & PRIORITY != 0 {
                let (fields, rest) = fragment.split_first_chunk::<5>().ok_or(())?;
                priority = Some(*fields);
                fragment = rest;
            }
            let fragment = fragment.get(..fragment.len().checked_sub(padding).ok_or(())?).ok_or(())?;
            self.pending = Some(PendingBlock {
                stream,
                end_stream: flags & END_STREAM != 0,
                priority,
                block: fragment.to_vec(),
                raw: frame.to_vec(),
            });
        } else {
            let pending = self.pending.as_mut().ok_or(())?;
            if pending.stream != stream {
                return Err(());
            }
            pending.block.extend_from_slice(payload);
            pending.raw.extend_from_slice(frame);
        }
        if flags & END_HEADERS != 0 {
            let pending = self.pending.take().ok_or(())?;
            if self.emit(&pending).is_err() {
                self.pending = Some(pending);
                // The frame that ended the block goes back to the input:
                // only the earlier ones stay in `raw`.
                let pending = self.pending.as_mut().ok_or(())?;
                pending.raw.truncate(pending.raw.len() - frame.len());
                return Err(());
            }
        }
        Ok(())
    }

    /// Decodes a complete block, rewrites its `:authority` and writes it out
    /// as one HEADERS frame and as many CONTINUATION frames as it needs.
    fn emit(&mut self, pending: &PendingBlock) -> Result<(), ()> {
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(16);
        let mut changed = false;
        let mut has_authority = false;
        let mut decoded = 0_usize;
        let authority = &self.authority;
        self.decoder
            .decode_with_cb(&pending.block, |name, value| {
                // Past the bound nothing more is kept (the decoder still
                // runs to the end: its table must stay whole).
                decoded = decoded.saturating_add(name.len() + value.len() + 32);
                if decoded > MAX_DECODED {
                    return;
                }
                has_authority |= &*name == b":authority";
                let value = match (&*name == b":authority").then(|| authority.rewrite(&value)).flatten() {
                    Some(new) => {
                        changed |= new != &*value;
                        new.to_vec()
                    }
                    None => value.into_owned(),
                };
                headers.push((name.into_owned(), value));
            })
            .map_err(|error| tracing::debug!(?error, "a header block could not be decoded; passed on as it came"))?;
        if decoded > MAX_DECODED {
            tracing::debug!(decoded, "a header block decodes past {MAX_DECODED} bytes; passed on as it came");
            return Err(());
        }
        if changed {
            self.rewritten += 1;
        }
        let first_block = std::mem::replace(&mut self.first_block, false);
        if first_block && !changed && self.authority == Authority::Normalise && has_authority {
            // The client's first request names an `:authority` the server
            // accepts as sent (the kubelet's clients send `localhost`): a
            // gRPC channel sends the same one on every request, so the rest
            // of the connection needs no rewriting. The block goes on as it
            // came, so the server's HPACK table stays the client's and every
            // later frame can too: no decoding and encoding per request
            // (which cost ~4× a bare server's whole Allocate in
            // instructions). A later request with another value reaches
            // the server as sent, which refuses it as it would have.
            self.output.extend_from_slice(&pending.raw);
            self.position = Position::Passthrough;
            return Ok(());
        }
        let block = self.encoder.encode(headers.iter().map(|(name, value)| (&name[..], &value[..])));

        let mut rest = &block[..];
        let first_room = MAX_FRAME - if pending.priority.is_some() { 5 } else { 0 };
        let (first, after) = rest.split_at(rest.len().min(first_room));
        rest = after;
        let mut flags = if pending.end_stream { END_STREAM } else { 0 };
        if pending.priority.is_some() {
            flags |= PRIORITY;
        }
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        let priority = pending.priority.as_ref().map_or(&[][..], |fields| &fields[..]);
        self.frame(HEADERS, flags, pending.stream, &[priority, first]);
        while !rest.is_empty() {
            let (chunk, after) = rest.split_at(rest.len().min(MAX_FRAME));
            rest = after;
            let flags = if rest.is_empty() { END_HEADERS } else { 0 };
            self.frame(CONTINUATION, flags, pending.stream, &[chunk]);
        }
        Ok(())
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: u32, parts: &[&[u8]]) {
        let length: usize = parts.iter().map(|part| part.len()).sum();
        // Cannot overflow 24 bits: every caller stays within MAX_FRAME.
        self.output.put_uint(length as u64, 3);
        self.output.put_u8(kind);
        self.output.put_u8(flags);
        self.output.put_u32(stream);
        for part in parts {
            self.output.extend_from_slice(part);
        }
    }

    /// From here on everything goes on as it comes: first the frames of a
    /// block being collected, then the input.
    fn give_up(&mut self) {
        if let Some(pending) = self.pending.take() {
            self.output.extend_from_slice(&pending.raw);
        }
        self.position = Position::Passthrough;
    }
}

/// A connection whose incoming (server side) or outgoing (client side)
/// header blocks are rewritten; everything else passes untouched.
#[derive(Debug)]
pub struct Rewritten<S> {
    inner: S,
    reading: Option<HeaderRewriter>,
    writing: Option<HeaderRewriter>,
    read_buffer: BytesMut,
    read_ended: bool,
}

impl<S> Rewritten<S> {
    /// The server side of `inner`: the requests' `:authority` is made
    /// acceptable ([`Authority::Normalise`]).
    pub fn server(inner: S) -> Self {
        Rewritten {
            inner,
            reading: Some(HeaderRewriter::new(Authority::Normalise)),
            writing: None,
            read_buffer: BytesMut::new(),
            read_ended: false,
        }
    }

    /// The client side of `inner`, sending `authority` as every request's
    /// `:authority` whatever the client put there.
    pub fn client(inner: S, authority: Vec<u8>) -> Self {
        Rewritten {
            inner,
            reading: None,
            writing: Some(HeaderRewriter::new(Authority::SendAs(authority))),
            read_buffer: BytesMut::new(),
            read_ended: false,
        }
    }

    /// The connection underneath.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewritten<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let Some(rewriter) = this.reading.as_mut() else { return Pin::new(&mut this.inner).poll_read(cx, buf) };
        loop {
            let ready = rewriter.output();
            if !ready.is_empty() {
                let n = ready.len().min(buf.remaining());
                buf.put_slice(&ready[..n]);
                ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.read_ended {
                return Poll::Ready(Ok(()));
            }
            if rewriter.passing_through() {
                // Nothing held: read straight into the caller's buffer.
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            this.read_buffer.clear();
            this.read_buffer.reserve(8192);
            let read = ready!(tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.read_buffer))?;
            if read == 0 {
                this.read_ended = true;
                rewriter.finish();
            } else {
                rewriter.push(&this.read_buffer);
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> Rewritten<S> {
    /// Writes out what the write side's rewriter holds.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(rewriter) = self.writing.as_mut() else { return Poll::Ready(Ok(())) };
        let pending = rewriter.output();
        while !pending.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            pending.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewritten<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.writing.is_none() {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        ready!(this.poll_drain(cx))?;
        if let Some(rewriter) = this.writing.as_mut() {
            rewriter.push(buf);
        }
        // Start sending at once; what does not fit now goes at the next
        // write or flush.
        if let Poll::Ready(Err(error)) = this.poll_drain(cx) {
            return Poll::Ready(Err(error));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(rewriter) = self.writing.as_mut() {
            rewriter.finish();
        }
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Rewritten<tokio::net::UnixStream> {
    type ConnectInfo = <tokio::net::UnixStream as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests;
