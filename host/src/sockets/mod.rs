//! The Unix sockets devhost serves and dials, at the lowest floor: every
//! server (the device-plugin resources, the DRA driver's registration and
//! service sockets) and the fakes take their connections from here, and
//! nothing here knows what is served on them.
//!
//! * [`files`]: socket files: names, binding with mode 0600, removing those
//!   nobody listens on, telling one's own socket from a new file at its path.
//! * [`accept`]: accept loops that back off when descriptors run out, and
//!   hand each connection on through [`authority`].
//! * [`authority`]: the `:authority` real gRPC clients send on a Unix socket
//!   (a percent-encoded path, a raw path, nothing) made acceptable to the
//!   HTTP/2 server, once for every socket.
//! * [`client`]: dialling a gRPC server on a Unix socket, with the
//!   `:authority` the kubelet's clients send.

pub mod accept;
pub mod authority;
pub mod client;
pub mod files;

pub use accept::unix_incoming;
pub use files::{FileIdentity, bind};
