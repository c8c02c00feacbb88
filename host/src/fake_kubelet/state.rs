//! What the fake kubelet has seen: every `RegisterRequest` with its outcome,
//! and per resource the accepted registrations, the options, the latest
//! device list and the plugin connections. One std `Mutex` guards it; a
//! `watch` counter wakes waiters after every change.
//!
//! Connections are tracked per plugin instance, identified by socket path as
//! in 1.37 (§2.6): several may be open for one resource, and the *current*
//! one is the latest accepted registration's.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;
use tonic::transport::Channel;

use crate::proto::v1beta1::{Device, DevicePluginOptions, RegisterRequest};

/// Device lists kept per resource for waiters.
pub(super) const MAX_HISTORY: usize = 4096;

/// State shared by the public handle, the registration service and the
/// ListAndWatch tasks.
pub(super) struct Shared {
    pub(super) plugin_dir: PathBuf,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
}

/// Everything recorded, guarded by [`Shared::lock`].
#[derive(Default)]
pub(super) struct State {
    /// Every request received, in order, with the refusal message if refused.
    pub(super) requests: Vec<(RegisterRequest, Option<String>)>,
    pub(super) resources: HashMap<String, ResourceState>,
    next_connection_id: u64,
    /// Per resource, how many more accepted registrations get an error
    /// answer instead of success (a lost answer, as after a timeout).
    pub(super) lost_answers: HashMap<String, usize>,
}

/// One resource, across all its registrations.
#[derive(Default)]
pub(super) struct ResourceState {
    pub(super) accepted: usize,
    /// The latest accepted request.
    pub(super) latest: Option<RegisterRequest>,
    pub(super) options: Option<DevicePluginOptions>,
    pub(super) devices: Option<Vec<Device>>,
    /// Every list the current connections delivered, oldest first (the
    /// latest [`MAX_HISTORY`]), so a waiter sees a state that lasted only
    /// until the next message; `history_base` counts those dropped.
    pub(super) history: std::collections::VecDeque<Vec<Device>>,
    pub(super) history_base: usize,
    /// Oldest first; the last one is the current connection. Closed
    /// connections other than the current one are dropped.
    pub(super) connections: Vec<Connection>,
}

/// The kubelet's client for one accepted registration.
pub(super) struct Connection {
    pub(super) id: u64,
    pub(super) socket: PathBuf,
    /// Registered and its ListAndWatch stream not yet ended.
    pub(super) open: bool,
    /// ListAndWatch messages received on this connection.
    pub(super) messages: usize,
    /// The kubelet's channel to the plugin; dropped when the stream ends.
    pub(super) channel: Option<Channel>,
}

impl ResourceState {
    /// The latest accepted registration's connection.
    pub(super) fn current(&self) -> Option<&Connection> {
        self.connections.last()
    }

    fn connection_mut(&mut self, id: u64) -> Option<&mut Connection> {
        self.connections.iter_mut().find(|c| c.id == id)
    }

    /// Whether an instance on `socket` is still connected (1.37 duplicate check).
    pub(super) fn open_on(&self, socket: &Path) -> bool {
        self.connections.iter().any(|c| c.open && c.socket == socket)
    }

    fn prune(&mut self) {
        let last = self.connections.last().map(|c| c.id);
        self.connections.retain(|c| c.open || Some(c.id) == last);
    }
}

impl Shared {
    pub(super) fn new(plugin_dir: PathBuf) -> Self {
        Self { plugin_dir, state: Mutex::new(State::default()), changed: watch::Sender::new(0) }
    }

    /// The state; a panic elsewhere while holding it leaves plain data, so a
    /// poisoned lock is still usable.
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A receiver that sees every change made after this call.
    pub(super) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Records a received request; returns its index for [`Shared::refused`].
    pub(super) fn received(&self, request: RegisterRequest) -> usize {
        let mut state = self.lock();
        state.requests.push((request, None));
        let index = state.requests.len() - 1;
        drop(state);
        self.notify();
        index
    }

    /// Whether the answer to this accepted registration of `resource` is
    /// to be lost (one fewer to lose from now on).
    pub(super) fn take_lost_answer(&self, resource: &str) -> bool {
        let mut state = self.lock();
        match state.lost_answers.get_mut(resource) {
            Some(left) if *left > 0 => {
                *left -= 1;
                true
            }
            _ => false,
        }
    }

    /// Marks request `index` as refused with `message`.
    pub(super) fn refused(&self, index: usize, message: &str) {
        if let Some(entry) = self.lock().requests.get_mut(index) {
            entry.1 = Some(message.to_owned());
        }
        self.notify();
    }

    /// Records an accepted registration and its new connection, unless an
    /// instance on the same socket is still connected (then returns `Err`
    /// with the refusal text). Returns the connection ID.
    pub(super) fn accept(
        &self,
        request: &RegisterRequest,
        socket: &Path,
        options: DevicePluginOptions,
        channel: Channel,
    ) -> Result<u64, String> {
        let mut state = self.lock();
        let id = state.next_connection_id;
        let resource = state.resources.entry(request.resource_name.clone()).or_default();
        if resource.open_on(socket) {
            return Err(format!(
                "device plugin for resource {:?} on socket {:?} is already registered and connected; \
                 close the old connection (restart the plugin's server) before registering again",
                request.resource_name,
                socket.display().to_string()
            ));
        }
        resource.accepted += 1;
        resource.latest = Some(request.clone());
        resource.options = Some(options);
        // Device lists stay as they were until the new stream's first message (§2.6).
        resource.connections.push(Connection {
            id,
            socket: socket.to_owned(),
            open: true,
            messages: 0,
            channel: Some(channel),
        });
        resource.prune();
        state.next_connection_id += 1;
        drop(state);
        self.notify();
        Ok(id)
    }

    /// Records one ListAndWatch message on connection `id`. Only the current
    /// connection's messages replace the resource's device list.
    pub(super) fn devices_received(&self, resource: &str, id: u64, devices: Vec<Device>) {
        let mut state = self.lock();
        let Some(res) = state.resources.get_mut(resource) else {
            return;
        };
        let current = res.current().map(|c| c.id) == Some(id);
        if let Some(conn) = res.connection_mut(id) {
            conn.messages += 1;
        }
        if current {
            if res.history.len() == MAX_HISTORY {
                res.history.pop_front();
                res.history_base += 1;
            }
            res.history.push_back(devices.clone());
            res.devices = Some(devices);
        }
        drop(state);
        self.notify();
    }

    /// Marks connection `id` closed and drops the kubelet's channel (§2.5).
    pub(super) fn disconnected(&self, resource: &str, id: u64) {
        let mut state = self.lock();
        if let Some(res) = state.resources.get_mut(resource) {
            if let Some(conn) = res.connection_mut(id) {
                conn.open = false;
                conn.channel = None;
            }
            res.prune();
        }
        drop(state);
        self.notify();
    }

    /// Marks every connection closed (kubelet stop or restart).
    pub(super) fn disconnect_all(&self) {
        let mut state = self.lock();
        for res in state.resources.values_mut() {
            for conn in &mut res.connections {
                conn.open = false;
                conn.channel = None;
            }
            res.prune();
        }
        drop(state);
        self.notify();
    }
}

/// Renders a device list for error messages: `[id Health, ...]`.
pub(super) fn render_devices(devices: Option<&[Device]>) -> String {
    match devices {
        None => "no ListAndWatch message yet".to_owned(),
        Some(devices) => {
            let items: Vec<String> = devices.iter().map(|d| format!("{:?} {:?}", d.id, d.health)).collect();
            format!("[{}]", items.join(", "))
        }
    }
}
