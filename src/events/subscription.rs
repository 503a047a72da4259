//! The subscription task: one websocket to `/api/events/out` for the whole service.
//!
//! Its life is a small state machine ([`Mode`]). While subscribed it resolves waiters from
//! flow-run state events and runs a slow safety poll. When the socket drops it polls every
//! waiting run with one bulk REST call per interval until it has reconnected. After each
//! connection it checks every waiting run once, so completions missed while the socket was
//! down are still delivered.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::message::{auth_message, filter_message, parse_server_message, FlowRunStateEvent, ServerMessage};
use crate::backoff::Backoff;
use crate::config::Config;
use crate::prefect::PrefectClient;
use crate::waiters::{Completion, CompletionSource, Resolution, WaiterRegistry};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Time allowed for the upgrade and for the server's reply to our auth message.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A socket that delivers no frame for this long is treated as dead. Prefect's server pings
/// every 20 s, so a healthy socket is never this quiet.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A connection that lasted this long resets the reconnect backoff.
const HEALTHY_PERIOD: Duration = Duration::from_secs(60);
/// How far before the last event seen a reconnect's backfill starts. Prefect persists events
/// in batches every few seconds, so the margin covers events still in flight at the drop.
const BACKFILL_MARGIN: chrono::Duration = chrono::Duration::seconds(60);
/// Number of event ids remembered to drop repeated deliveries across reconnects.
const SEEN_EVENTS_CAPACITY: usize = 4096;

/// Stage of the subscription's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Opening the socket and sending the auth and filter messages.
    Connecting,
    /// The socket is open and filtered; completions arrive as events.
    Subscribed,
    /// The socket is down; waiting runs are polled until the next connection attempt.
    BackingOff,
    /// The server rejects websockets (HTTP 403 or 404 on upgrade, or an auth refusal);
    /// waiting runs are polled and the socket is retried at the slowest reconnect delay.
    Polling,
    /// Shut down.
    Stopped,
}

/// Subscription state that an operator needs to see.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubscriptionStatus {
    pub mode: Mode,
    /// Websocket connections that completed the handshake since start-up.
    pub connections: u64,
    /// Events received, duplicates included.
    pub events_received: u64,
    /// Events dropped because their id was seen before.
    pub duplicate_events: u64,
    /// Bulk REST checks of waiting runs (after connecting, fallback and safety polls).
    pub polls: u64,
    /// Waiting jobs resolved by a terminal state event.
    pub completions_from_events: u64,
    /// Waiting jobs resolved by a bulk REST check.
    pub completions_from_polls: u64,
    pub last_event_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

impl SubscriptionStatus {
    fn starting() -> Self {
        Self {
            mode: Mode::Connecting,
            connections: 0,
            events_received: 0,
            duplicate_events: 0,
            polls: 0,
            completions_from_events: 0,
            completions_from_polls: 0,
            last_event_at: None,
            last_error: None,
        }
    }
}

/// Owner's side of the running subscription task.
#[derive(Debug)]
pub struct SubscriptionHandle {
    status: watch::Receiver<SubscriptionStatus>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl SubscriptionHandle {
    /// Returns a snapshot of the subscription's state.
    pub fn status(&self) -> SubscriptionStatus {
        self.status.borrow().clone()
    }

    /// Waits until the socket is subscribed, for at most `limit`. Returns false on timeout,
    /// in which case completions are still found by polling.
    pub async fn wait_until_subscribed(&self, limit: Duration) -> bool {
        let mut status = self.status.clone();
        let subscribed =
            async move { status.wait_for(|status| status.mode == Mode::Subscribed).await.is_ok() };
        timeout(limit, subscribed).await.unwrap_or(false)
    }

    /// Stops the task, closing the socket, and ends every remaining wait.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        if let Err(error) = self.task.await {
            error!(%error, "events subscription task failed");
        }
    }
}

/// The task's own state.
pub struct Subscription {
    events_url: String,
    auth_token: Option<String>,
    tag: String,
    fallback_poll_interval: Duration,
    safety_poll_interval: Duration,
    slow_retry: Duration,
    client: Arc<PrefectClient>,
    registry: Arc<WaiterRegistry>,
    status: watch::Sender<SubscriptionStatus>,
    shutdown: CancellationToken,
    backoff: Backoff,
    seen: SeenEvents,
    last_event_occurred: Option<DateTime<Utc>>,
}

/// Reason a connected socket stopped delivering.
#[derive(Debug)]
enum StreamEnd {
    Shutdown,
    /// The server closed with a code: 1012 on restart, 1011 on a keepalive failure,
    /// 1008 on an auth refusal, 1002 on a filter it rejects.
    Closed {
        code: Option<CloseCode>,
        reason: String,
    },
    /// The connection dropped without a close frame (1006) or failed to read.
    Dropped(String),
    /// No frame for [`IDLE_TIMEOUT`].
    Idle,
}

/// Reason a connection attempt failed.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("websocket upgrade rejected with HTTP {0}")]
    Rejected(u16),
    #[error("server closed the socket during the handshake: {0}")]
    ClosedDuringHandshake(String),
    #[error("no reply within {} s", HANDSHAKE_TIMEOUT.as_secs())]
    Timeout,
    #[error("unexpected handshake message: {0}")]
    Unexpected(String),
    #[error(transparent)]
    Socket(#[from] tungstenite::Error),
}

impl ConnectError {
    /// Refusals that retrying soon cannot fix: hosting without websockets, or bad credentials.
    fn is_refusal(&self) -> bool {
        match self {
            Self::Rejected(status) => matches!(status, 401 | 403 | 404),
            Self::ClosedDuringHandshake(reason) => reason.starts_with("1008"),
            _ => false,
        }
    }
}

impl Subscription {
    /// Starts the subscription task for `config`, resolving waiters in `registry`.
    pub fn spawn(
        config: &Config,
        client: Arc<PrefectClient>,
        registry: Arc<WaiterRegistry>,
    ) -> SubscriptionHandle {
        let (status, status_receiver) = watch::channel(SubscriptionStatus::starting());
        let shutdown = CancellationToken::new();
        let subscription = Self {
            events_url: config.events_url(),
            auth_token: config.auth.as_ref().map(|auth| auth.websocket_token().to_owned()),
            tag: config.tag.clone(),
            fallback_poll_interval: config.fallback_poll_interval,
            safety_poll_interval: config.safety_poll_interval,
            slow_retry: config.reconnect_max,
            client,
            registry,
            status,
            shutdown: shutdown.clone(),
            backoff: Backoff::new(config.reconnect_initial, config.reconnect_max),
            seen: SeenEvents::default(),
            last_event_occurred: None,
        };
        let task = tokio::spawn(subscription.run());
        SubscriptionHandle { status: status_receiver, shutdown, task }
    }

    async fn run(mut self) {
        info!(url = %self.events_url, "events subscription starting");
        while !self.shutdown.is_cancelled() {
            let retry_delay = self.connect_and_stream().await;
            if self.shutdown.is_cancelled() {
                break;
            }
            self.poll_until(retry_delay).await;
        }
        self.set_mode(Mode::Stopped);
        self.registry.close_all();
        info!("events subscription stopped");
    }

    /// Connects, streams until the socket ends, and returns how long to wait before the next
    /// attempt. The mode on return says whether to back off or stay in polling mode.
    async fn connect_and_stream(&mut self) -> Duration {
        self.set_mode(Mode::Connecting);
        let connected = tokio::select! {
            () = self.shutdown.cancelled() => return Duration::ZERO,
            connected = self.connect() => connected,
        };
        let socket = match connected {
            Ok(socket) => socket,
            Err(error) => return self.on_connect_failed(&error),
        };
        let connected_at = Instant::now();
        self.on_subscribed().await;
        let end = self.stream(socket).await;
        if connected_at.elapsed() >= HEALTHY_PERIOD {
            self.backoff.reset();
        }
        self.on_stream_end(&end)
    }

    async fn connect(&self) -> Result<Socket, ConnectError> {
        let mut request = self.events_url.as_str().into_client_request()?;
        request.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("prefect"));
        let (mut socket, _) = timeout(HANDSHAKE_TIMEOUT, tokio_tungstenite::connect_async(request))
            .await
            .map_err(|_| ConnectError::Timeout)?
            .map_err(upgrade_error)?;

        socket.send(Message::text(auth_message(self.auth_token.as_deref()))).await?;
        let reply =
            timeout(HANDSHAKE_TIMEOUT, next_text(&mut socket)).await.map_err(|_| ConnectError::Timeout)??;
        match parse_server_message(&reply) {
            Ok(ServerMessage::AuthSuccess) => {}
            _ => return Err(ConnectError::Unexpected(reply.chars().take(200).collect())),
        }

        let now = Utc::now();
        let (since, backfill) = match self.last_event_occurred {
            Some(last) => (last - BACKFILL_MARGIN, true),
            None => (now, false),
        };
        socket.send(Message::text(filter_message(&self.tag, since, now, backfill))).await?;
        Ok(socket)
    }

    fn on_connect_failed(&mut self, error: &ConnectError) -> Duration {
        self.record_error(error.to_string());
        if error.is_refusal() {
            warn!(
                url = %self.events_url, %error, retry_in = ?self.slow_retry,
                "Prefect rejects the events websocket; waiting runs are polled over REST instead"
            );
            self.set_mode(Mode::Polling);
            return self.slow_retry;
        }
        let delay = self.backoff.next_delay();
        debug!(url = %self.events_url, %error, retry_in = ?delay, "events websocket connection failed");
        self.set_mode(Mode::BackingOff);
        delay
    }

    async fn on_subscribed(&mut self) {
        let connections = self.status.borrow().connections + 1;
        self.status.send_modify(|status| {
            status.mode = Mode::Subscribed;
            status.connections = connections;
            status.last_error = None;
        });
        if connections == 1 {
            info!(url = %self.events_url, "events websocket subscribed");
        } else {
            info!(url = %self.events_url, connections, "events websocket subscribed again; checking waiting runs");
        }
        self.poll_waiting("subscribed").await;
    }

    async fn stream(&mut self, mut socket: Socket) -> StreamEnd {
        let mut safety_poll = tokio::time::interval(self.safety_poll_interval);
        safety_poll.reset();
        loop {
            let frame = tokio::select! {
                () = self.shutdown.cancelled() => {
                    close_quietly(&mut socket).await;
                    return StreamEnd::Shutdown;
                }
                _ = safety_poll.tick() => {
                    self.poll_waiting("safety").await;
                    continue;
                }
                frame = timeout(IDLE_TIMEOUT, socket.next()) => frame,
            };
            if let Some(end) = self.handle_frame(frame) {
                return end;
            }
        }
    }

    fn handle_frame(
        &mut self,
        frame: Result<Option<Result<Message, tungstenite::Error>>, tokio::time::error::Elapsed>,
    ) -> Option<StreamEnd> {
        match frame {
            Err(_) => Some(StreamEnd::Idle),
            Ok(None) => Some(StreamEnd::Dropped("connection closed without a close frame".to_owned())),
            Ok(Some(Err(error))) => Some(StreamEnd::Dropped(error.to_string())),
            Ok(Some(Ok(Message::Close(frame)))) => Some(StreamEnd::Closed {
                code: frame.as_ref().map(|frame| frame.code),
                reason: frame.map(|frame| frame.reason.to_string()).unwrap_or_default(),
            }),
            Ok(Some(Ok(Message::Text(text)))) => {
                self.handle_text(&text);
                None
            }
            // Pongs to the server's pings are queued by tungstenite and sent on the next read.
            Ok(Some(Ok(_))) => None,
        }
    }

    fn handle_text(&mut self, text: &str) {
        let message = match parse_server_message(text) {
            Ok(message) => message,
            Err(error) => {
                warn!(%error, "ignoring an events message that could not be parsed");
                return;
            }
        };
        let ServerMessage::Event { id, state_change } = message else {
            return;
        };
        let duplicate = id.is_some_and(|id| !self.seen.insert(id));
        self.status.send_modify(|status| {
            status.events_received += 1;
            status.duplicate_events += u64::from(duplicate);
            status.last_event_at = Some(Utc::now());
        });
        if duplicate {
            return;
        }
        if let Some(change) = state_change {
            self.handle_state_change(change);
        }
    }

    fn handle_state_change(&mut self, change: FlowRunStateEvent) {
        self.last_event_occurred =
            Some(self.last_event_occurred.map_or(change.occurred, |last| last.max(change.occurred)));
        debug!(flow_run_id = %change.flow_run_id, state = %change.state.name, "flow run state event");
        if !change.state.is_terminal() {
            return;
        }
        let completion = Completion { state: change.state, source: CompletionSource::Event };
        let resolution = self.registry.resolve(change.flow_run_id, completion);
        if resolution == Resolution::Delivered {
            self.status.send_modify(|status| status.completions_from_events += 1);
        }
        debug!(flow_run_id = %change.flow_run_id, ?resolution, "terminal state event");
    }

    fn on_stream_end(&mut self, end: &StreamEnd) -> Duration {
        let delay = self.backoff.next_delay();
        match end {
            StreamEnd::Shutdown => return Duration::ZERO,
            StreamEnd::Closed { code: Some(CloseCode::Protocol), reason } => {
                error!(%reason, "Prefect rejected the events filter (close 1002); this is a bug in the filter message");
            }
            StreamEnd::Closed { code: Some(CloseCode::Policy), reason } => {
                warn!(%reason, "Prefect closed the events websocket for a policy violation (1008), usually bad credentials");
                self.record_error(format!("closed with 1008: {reason}"));
                self.set_mode(Mode::Polling);
                return self.slow_retry;
            }
            StreamEnd::Closed { code, reason } => {
                info!(code = ?code, %reason, retry_in = ?delay, "events websocket closed by the server; reconnecting");
            }
            StreamEnd::Dropped(reason) => {
                info!(%reason, retry_in = ?delay, "events websocket dropped; reconnecting");
            }
            StreamEnd::Idle => {
                warn!(idle = ?IDLE_TIMEOUT, retry_in = ?delay, "events websocket silent for too long; reconnecting");
            }
        }
        self.record_error(format!("{end:?}"));
        self.set_mode(Mode::BackingOff);
        delay
    }

    /// Polls waiting runs every fallback interval until `delay` has passed or shutdown.
    async fn poll_until(&mut self, delay: Duration) {
        let deadline = Instant::now() + delay;
        loop {
            self.poll_waiting("fallback").await;
            let next = (Instant::now() + self.fallback_poll_interval).min(deadline);
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep_until(next) => {}
            }
            if Instant::now() >= deadline {
                return;
            }
        }
    }

    /// Reads every waiting run with one bulk REST call and resolves those that finished.
    async fn poll_waiting(&mut self, reason: &'static str) {
        let waiting = self.registry.waiting_ids();
        if waiting.is_empty() {
            return;
        }
        self.status.send_modify(|status| status.polls += 1);
        let runs = match self.client.read_flow_runs(&waiting).await {
            Ok(runs) => runs,
            Err(error) => {
                warn!(reason, waiting = waiting.len(), %error, "bulk read of waiting flow runs failed");
                return;
            }
        };
        let mut finished = 0;
        for run in runs {
            let Some(state) = run.terminal_state() else { continue };
            let completion = Completion { state: state.clone(), source: CompletionSource::Poll };
            if self.registry.resolve(run.id, completion) == Resolution::Delivered {
                self.status.send_modify(|status| status.completions_from_polls += 1);
            }
            finished += 1;
        }
        debug!(reason, waiting = waiting.len(), finished, "polled waiting flow runs");
    }

    fn set_mode(&self, mode: Mode) {
        self.status.send_if_modified(|status| {
            let changed = status.mode != mode;
            status.mode = mode;
            changed
        });
    }

    fn record_error(&self, error: String) {
        self.status.send_modify(|status| status.last_error = Some(error));
    }
}

/// Reads frames until a text frame, answering pings on the way.
async fn next_text(socket: &mut Socket) -> Result<String, ConnectError> {
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => return Ok(text.to_string()),
            Some(Ok(Message::Close(frame))) => {
                let reason = frame
                    .map(|frame| format!("{} {}", u16::from(frame.code), frame.reason))
                    .unwrap_or_default();
                return Err(ConnectError::ClosedDuringHandshake(reason));
            }
            Some(Ok(_)) => continue,
            Some(Err(error)) => return Err(error.into()),
            None => return Err(ConnectError::ClosedDuringHandshake("connection dropped".to_owned())),
        }
    }
}

fn upgrade_error(error: tungstenite::Error) -> ConnectError {
    match error {
        tungstenite::Error::Http(response) => ConnectError::Rejected(response.status().as_u16()),
        other => ConnectError::Socket(other),
    }
}

async fn close_quietly(socket: &mut Socket) {
    let frame = CloseFrame { code: CloseCode::Away, reason: "k3s-job-runner shutting down".into() };
    let _ = timeout(Duration::from_secs(1), socket.close(Some(frame))).await;
}

/// Recently seen event ids, oldest forgotten first, so memory stays bounded.
#[derive(Debug, Default)]
struct SeenEvents {
    order: VecDeque<uuid::Uuid>,
    ids: HashSet<uuid::Uuid>,
}

impl SeenEvents {
    /// Records `id`; returns false when it was already seen.
    fn insert(&mut self, id: uuid::Uuid) -> bool {
        if !self.ids.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > SEEN_EVENTS_CAPACITY {
            if let Some(oldest) = self.order.pop_front() {
                self.ids.remove(&oldest);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_events_drop_repeats() {
        let mut seen = SeenEvents::default();
        let id = uuid::Uuid::new_v4();
        assert!(seen.insert(id));
        assert!(!seen.insert(id));
    }

    #[test]
    fn seen_events_are_bounded() {
        let mut seen = SeenEvents::default();
        let first = uuid::Uuid::new_v4();
        seen.insert(first);
        for _ in 0..SEEN_EVENTS_CAPACITY {
            seen.insert(uuid::Uuid::new_v4());
        }
        assert_eq!(seen.ids.len(), SEEN_EVENTS_CAPACITY);
        assert!(seen.insert(first), "the oldest id should have been forgotten");
    }

    #[test]
    fn refusals_are_told_apart_from_transient_failures() {
        assert!(ConnectError::Rejected(403).is_refusal());
        assert!(ConnectError::Rejected(404).is_refusal());
        assert!(!ConnectError::Rejected(502).is_refusal());
        assert!(ConnectError::ClosedDuringHandshake("1008 Invalid token".to_owned()).is_refusal());
        assert!(!ConnectError::Timeout.is_refusal());
    }
}
