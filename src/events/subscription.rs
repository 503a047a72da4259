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
use futures::future::BoxFuture;
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
use uuid::Uuid;

use super::message::{auth_message, filter_message, parse_server_message, FlowRunStateEvent, ServerMessage};
use crate::backoff::Backoff;
use crate::config::Config;
use crate::prefect::{FlowRun, PrefectClient, PrefectError};
use crate::waiters::{Completion, CompletionSource, Resolution, WaiterRegistry};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A websocket as the streaming loop uses it: frames in, frames out. The real socket and the
/// in-memory sockets of the unit tests both fit.
trait FrameSocket:
    futures::Stream<Item = Result<Message, tungstenite::Error>>
    + futures::Sink<Message, Error = tungstenite::Error>
    + Unpin
{
}

impl<S> FrameSocket for S where
    S: futures::Stream<Item = Result<Message, tungstenite::Error>>
        + futures::Sink<Message, Error = tungstenite::Error>
        + Unpin
{
}

/// Bulk reader of flow runs, the one REST call the subscription makes.
pub trait FlowRunReader: Send + Sync {
    /// Reads the flow runs with the given ids.
    fn read_flow_runs<'a>(&'a self, ids: &'a [Uuid]) -> BoxFuture<'a, Result<Vec<FlowRun>, PrefectError>>;
}

impl FlowRunReader for PrefectClient {
    fn read_flow_runs<'a>(&'a self, ids: &'a [Uuid]) -> BoxFuture<'a, Result<Vec<FlowRun>, PrefectError>> {
        Box::pin(PrefectClient::read_flow_runs(self, ids))
    }
}

/// Time allowed for the upgrade and for the server's reply to our auth message.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A socket that delivers no frame for this long is treated as dead. Prefect's server pings
/// every 20 s, so a healthy socket is never this quiet.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Interval of our own pings. Prefect's server pings every 20 s too, but a ping of ours makes
/// a dead peer show up as a failed write or a silent socket even if the server's pings stop.
const PING_INTERVAL: Duration = Duration::from_secs(20);
/// Failed connection attempts in a row between two warnings; the ones in between log at debug.
const FAILURE_WARNING_EVERY: u32 = 20;
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
    task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
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

    /// Stops the task, closing the socket, and ends every remaining wait. Later calls return
    /// at once.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        let Some(task) = self.task.lock().await.take() else { return };
        if let Err(error) = task.await {
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
    client: Arc<dyn FlowRunReader>,
    registry: Arc<WaiterRegistry>,
    status: watch::Sender<SubscriptionStatus>,
    shutdown: CancellationToken,
    backoff: Backoff,
    seen: SeenEvents,
    last_event_occurred: Option<DateTime<Utc>>,
    /// Failed connection attempts since the last subscription, for rate-limited warnings.
    failures_in_a_row: u32,
}

/// Next step of the subscription, decided from how the last attempt ended. Pacing (how
/// long to wait) is applied separately by [`Subscription::pace`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Reconnect after the backoff delay, polling waiting runs meanwhile.
    Reconnect,
    /// The server rejects websockets: poll waiting runs and retry the socket slowly.
    PollAndRetrySlowly,
    /// Shutting down.
    Stop,
}

impl Next {
    fn after_connect_failure(error: &ConnectError) -> Self {
        if error.is_refusal() {
            Self::PollAndRetrySlowly
        } else {
            Self::Reconnect
        }
    }

    fn after_stream_end(end: &StreamEnd) -> Self {
        match end {
            StreamEnd::Shutdown => Self::Stop,
            StreamEnd::Closed { code: Some(CloseCode::Policy), .. } => Self::PollAndRetrySlowly,
            // 1012 (server restart), 1011 (keepalive failure), 1002 (filter rejected, a bug
            // that is logged) and every other close, drop or silence: reconnect.
            StreamEnd::Closed { .. } | StreamEnd::Dropped(_) | StreamEnd::Idle => Self::Reconnect,
        }
    }
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
        client: Arc<dyn FlowRunReader>,
        registry: Arc<WaiterRegistry>,
    ) -> SubscriptionHandle {
        let (subscription, status_receiver) = Self::new(config, client, registry);
        let shutdown = subscription.shutdown.clone();
        let task = tokio::spawn(subscription.run());
        SubscriptionHandle { status: status_receiver, shutdown, task: tokio::sync::Mutex::new(Some(task)) }
    }

    fn new(
        config: &Config,
        client: Arc<dyn FlowRunReader>,
        registry: Arc<WaiterRegistry>,
    ) -> (Self, watch::Receiver<SubscriptionStatus>) {
        let (status, status_receiver) = watch::channel(SubscriptionStatus::starting());
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
            shutdown: CancellationToken::new(),
            backoff: Backoff::new(config.reconnect_initial, config.reconnect_max),
            seen: SeenEvents::default(),
            last_event_occurred: None,
            failures_in_a_row: 0,
        };
        (subscription, status_receiver)
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
    /// attempt. The mode on return tells whether to back off or stay in polling mode.
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
        self.failures_in_a_row += 1;
        let next = Next::after_connect_failure(error);
        let (mode, delay) = self.pace(next);
        let failures = self.failures_in_a_row;
        if next == Next::PollAndRetrySlowly {
            warn!(
                url = %self.events_url, %error, retry_in = ?delay,
                "Prefect rejects the events websocket; waiting runs are polled over REST instead"
            );
        } else if failures == 1 || failures % FAILURE_WARNING_EVERY == 0 {
            warn!(
                url = %self.events_url, %error, failures, retry_in = ?delay,
                "cannot connect the events websocket; polling waiting runs until it connects"
            );
        } else {
            debug!(url = %self.events_url, %error, failures, retry_in = ?delay, "events websocket connection failed");
        }
        self.set_mode(mode);
        delay
    }

    /// Turns a decision into the mode to enter and the time to wait before the next attempt.
    fn pace(&mut self, next: Next) -> (Mode, Duration) {
        match next {
            Next::Reconnect => (Mode::BackingOff, self.backoff.next_delay()),
            Next::PollAndRetrySlowly => (Mode::Polling, self.slow_retry),
            Next::Stop => (Mode::Stopped, Duration::ZERO),
        }
    }

    async fn on_subscribed(&mut self) {
        self.failures_in_a_row = 0;
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

    async fn stream(&mut self, mut socket: impl FrameSocket) -> StreamEnd {
        let mut safety_poll = tokio::time::interval(self.safety_poll_interval);
        safety_poll.reset();
        let mut ping = tokio::time::interval(PING_INTERVAL);
        ping.reset();
        // One deadline for the whole stream, moved only by received frames: the ping and
        // safety-poll ticks must not count as signs of life.
        let mut idle_deadline = Instant::now() + IDLE_TIMEOUT;
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
                _ = ping.tick() => match send_ping(&mut socket).await {
                    Ok(()) => continue,
                    Err(end) => return end,
                },
                () = tokio::time::sleep_until(idle_deadline) => return StreamEnd::Idle,
                frame = socket.next() => frame,
            };
            idle_deadline = Instant::now() + IDLE_TIMEOUT;
            if let Some(end) = self.handle_frame(frame) {
                return end;
            }
        }
    }

    fn handle_frame(&mut self, frame: Option<Result<Message, tungstenite::Error>>) -> Option<StreamEnd> {
        match frame {
            None => Some(StreamEnd::Dropped("connection closed without a close frame".to_owned())),
            Some(Err(error)) => Some(StreamEnd::Dropped(error.to_string())),
            Some(Ok(Message::Close(frame))) => Some(StreamEnd::Closed {
                code: frame.as_ref().map(|frame| frame.code),
                reason: frame.map(|frame| frame.reason.to_string()).unwrap_or_default(),
            }),
            Some(Ok(Message::Text(text))) => {
                self.handle_text(&text);
                None
            }
            // Pongs to the server's pings are queued by tungstenite and sent on the next read.
            Some(Ok(_)) => None,
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
            self.registry.note_state(change.flow_run_id, &change.state.name);
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
        let next = Next::after_stream_end(end);
        let (mode, delay) = self.pace(next);
        match end {
            StreamEnd::Shutdown => return delay,
            StreamEnd::Closed { code: Some(CloseCode::Protocol), reason } => {
                error!(%reason, "Prefect rejected the events filter (close 1002); this is a bug in the filter message");
            }
            StreamEnd::Closed { code: Some(CloseCode::Policy), reason } => {
                warn!(%reason, retry_in = ?delay, "Prefect closed the events websocket for a policy violation (1008), usually bad credentials; polling waiting runs instead");
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
        self.set_mode(mode);
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

/// Reads frames until a text frame. Pongs to pings are queued by tungstenite on the way.
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

async fn send_ping(socket: &mut impl FrameSocket) -> Result<(), StreamEnd> {
    match timeout(HANDSHAKE_TIMEOUT, socket.send(Message::Ping(Vec::new().into()))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(StreamEnd::Dropped(format!("sending a ping failed: {error}"))),
        Err(_) => Err(StreamEnd::Dropped("sending a ping timed out".to_owned())),
    }
}

async fn close_quietly(socket: &mut impl FrameSocket) {
    let frame = CloseFrame { code: CloseCode::Away, reason: "k3s-job-runner shutting down".into() };
    let _ = timeout(Duration::from_secs(1), socket.send(Message::Close(Some(frame)))).await;
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

    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};

    use futures::channel::mpsc;
    use serde_json::json;

    use crate::prefect::{State, StateType};
    use crate::waiters::CompletionSource;

    /// An in-memory websocket: the test pushes frames in and reads what the loop sent.
    struct FakeSocket {
        incoming: mpsc::UnboundedReceiver<Result<Message, tungstenite::Error>>,
        sent: mpsc::UnboundedSender<Message>,
    }

    impl futures::Stream for FakeSocket {
        type Item = Result<Message, tungstenite::Error>;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.incoming.poll_next_unpin(cx)
        }
    }

    impl futures::Sink<Message> for FakeSocket {
        type Error = tungstenite::Error;

        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
            let _ = self.sent.unbounded_send(item);
            Ok(())
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
    }

    struct Ends {
        frames: mpsc::UnboundedSender<Result<Message, tungstenite::Error>>,
        sent: mpsc::UnboundedReceiver<Message>,
    }

    fn fake_socket() -> (FakeSocket, Ends) {
        let (frames, incoming) = mpsc::unbounded();
        let (sent_sender, sent) = mpsc::unbounded();
        (FakeSocket { incoming, sent: sent_sender }, Ends { frames, sent })
    }

    /// Returns every run it is asked for in `state_type`, and counts the calls.
    struct FakeReader {
        state_type: StateType,
        calls: AtomicUsize,
    }

    impl FlowRunReader for FakeReader {
        fn read_flow_runs<'a>(
            &'a self,
            ids: &'a [Uuid],
        ) -> BoxFuture<'a, Result<Vec<FlowRun>, PrefectError>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let runs = ids.iter().map(|id| flow_run(*id, self.state_type)).collect();
            Box::pin(async move { Ok(runs) })
        }
    }

    fn flow_run(id: Uuid, state_type: StateType) -> FlowRun {
        let name = format!("{state_type:?}");
        let state = State { state_type, name, message: None, timestamp: None };
        FlowRun { id, name: "test-run".to_owned(), state: Some(state), start_time: None }
    }

    fn subscription_with(
        state_type: StateType,
        safety_poll_interval: Duration,
    ) -> (Subscription, Arc<FakeReader>, Arc<WaiterRegistry>) {
        let config = Config { safety_poll_interval, ..Config::default() };
        let reader = Arc::new(FakeReader { state_type, calls: AtomicUsize::new(0) });
        let registry = WaiterRegistry::new();
        let (subscription, _) = Subscription::new(&config, Arc::clone(&reader) as _, Arc::clone(&registry));
        (subscription, reader, registry)
    }

    fn close_after(frames: mpsc::UnboundedSender<Result<Message, tungstenite::Error>>, after: Duration) {
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = frames.unbounded_send(Ok(Message::Close(None)));
        });
    }

    fn completed_event(flow_run_id: Uuid, event_id: Uuid) -> Message {
        let frame = json!({
            "type": "event",
            "event": {
                "id": event_id,
                "occurred": "2026-12-04T15:00:00.123456Z",
                "event": "prefect.flow-run.Completed",
                "resource": {
                    "prefect.resource.id": format!("prefect.flow-run.{flow_run_id}"),
                    "prefect.state-type": "COMPLETED",
                    "prefect.state-name": "Completed",
                },
                "related": [],
                "payload": {},
            }
        });
        Message::text(frame.to_string())
    }

    #[tokio::test(start_paused = true)]
    async fn silent_socket_ends_after_idle_timeout() {
        let (mut subscription, _, _) = subscription_with(StateType::Running, Duration::from_secs(30));
        let (socket, _ends) = fake_socket();
        let started = Instant::now();

        let end = subscription.stream(socket).await;

        assert!(matches!(end, StreamEnd::Idle), "{end:?}");
        assert_eq!(started.elapsed(), IDLE_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn received_frames_keep_socket_alive() {
        let (mut subscription, _, _) = subscription_with(StateType::Running, Duration::from_secs(30));
        let (socket, ends) = fake_socket();
        let frames = ends.frames.clone();
        tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(50)).await;
                let _ = frames.unbounded_send(Ok(Message::Ping(Vec::new().into())));
            }
        });
        let started = Instant::now();

        let end = subscription.stream(socket).await;

        assert!(matches!(end, StreamEnd::Idle), "{end:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(150) + IDLE_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn pings_go_out_every_interval() {
        let (mut subscription, _, _) = subscription_with(StateType::Running, Duration::from_secs(30));
        let (socket, mut ends) = fake_socket();
        close_after(ends.frames.clone(), Duration::from_secs(45));

        let end = subscription.stream(socket).await;

        assert!(matches!(end, StreamEnd::Closed { .. }), "{end:?}");
        let mut pings = 0;
        while let Ok(message) = ends.sent.try_recv() {
            pings += usize::from(matches!(message, Message::Ping(_)));
        }
        assert_eq!(pings, 2, "pings at 20 s and 40 s");
    }

    #[tokio::test(start_paused = true)]
    async fn safety_poll_checks_waiting_runs_each_interval() {
        let (mut subscription, reader, registry) =
            subscription_with(StateType::Running, Duration::from_secs(5));
        let _waiter = registry.register(Uuid::new_v4());
        let (socket, ends) = fake_socket();
        close_after(ends.frames.clone(), Duration::from_secs(21));

        subscription.stream(socket).await;

        assert_eq!(reader.calls.load(Ordering::SeqCst), 4, "polls at 5, 10, 15 and 20 s");
        assert_eq!(subscription.status.borrow().polls, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn safety_poll_completes_run_on_silent_socket() {
        let (mut subscription, _, registry) = subscription_with(StateType::Completed, Duration::from_secs(5));
        let mut waiter = registry.register(Uuid::new_v4());
        let (socket, ends) = fake_socket();
        close_after(ends.frames.clone(), Duration::from_secs(6));

        subscription.stream(socket).await;

        let completion = waiter.completion().await.expect("resolved by the safety poll");
        assert_eq!(completion.source, CompletionSource::Poll);
        assert_eq!(completion.state.state_type, StateType::Completed);
        assert_eq!(subscription.status.borrow().completions_from_polls, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn fallback_polls_every_interval_until_retry() {
        let (mut subscription, reader, registry) =
            subscription_with(StateType::Running, Duration::from_secs(30));
        let _waiter = registry.register(Uuid::new_v4());
        let started = Instant::now();

        subscription.poll_until(Duration::from_millis(3500)).await;

        assert_eq!(started.elapsed(), Duration::from_millis(3500));
        assert_eq!(reader.calls.load(Ordering::SeqCst), 4, "polls at 0, 1, 2 and 3 s");
    }

    #[tokio::test(start_paused = true)]
    async fn terminal_event_resolves_waiter_once() {
        let (mut subscription, reader, registry) =
            subscription_with(StateType::Running, Duration::from_secs(30));
        let flow_run_id = Uuid::new_v4();
        let mut waiter = registry.register(flow_run_id);
        let (socket, ends) = fake_socket();
        let event_id = Uuid::new_v4();
        ends.frames.unbounded_send(Ok(completed_event(flow_run_id, event_id))).unwrap();
        ends.frames.unbounded_send(Ok(completed_event(flow_run_id, event_id))).unwrap();
        ends.frames.unbounded_send(Ok(Message::Close(None))).unwrap();

        subscription.stream(socket).await;

        let completion = waiter.completion().await.expect("resolved by the event");
        assert_eq!(completion.source, CompletionSource::Event);
        let status = subscription.status.borrow().clone();
        assert_eq!(status.events_received, 2);
        assert_eq!(status.duplicate_events, 1);
        assert_eq!(status.completions_from_events, 1);
        assert_eq!(reader.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_connections_back_off_up_to_cap() {
        let (mut subscription, reader, registry) =
            subscription_with(StateType::Running, Duration::from_secs(30));
        let _waiter = registry.register(Uuid::new_v4());
        let mut ceiling = Config::default().reconnect_initial;
        let cap = Config::default().reconnect_max;

        for _ in 0..12 {
            let delay = subscription.on_connect_failed(&ConnectError::Timeout);
            assert!(delay <= ceiling, "{delay:?} above {ceiling:?}");
            assert!(delay >= ceiling / 2, "{delay:?} below half of {ceiling:?}");
            assert_eq!(subscription.status.borrow().mode, Mode::BackingOff);
            // While backing off, waiting runs are polled once per fallback interval.
            let calls_before = reader.calls.load(Ordering::SeqCst);
            let started = Instant::now();
            subscription.poll_until(delay).await;
            // Tokio's timer rounds each sleep up to the next millisecond.
            assert!(started.elapsed() >= delay, "{:?} < {delay:?}", started.elapsed());
            assert!(started.elapsed() < delay + Duration::from_millis(5), "{:?}", started.elapsed());
            let expected_polls = delay.as_nanos().div_ceil(1_000_000_000) as usize;
            assert_eq!(reader.calls.load(Ordering::SeqCst) - calls_before, expected_polls.max(1));
            ceiling = (ceiling * 2).min(cap);
        }
        assert_eq!(ceiling, cap);
    }

    #[tokio::test(start_paused = true)]
    async fn refused_upgrade_retries_at_slow_pace() {
        let (mut subscription, _, _) = subscription_with(StateType::Running, Duration::from_secs(30));

        let delay = subscription.on_connect_failed(&ConnectError::Rejected(404));

        assert_eq!(delay, Config::default().reconnect_max);
        assert_eq!(subscription.status.borrow().mode, Mode::Polling);
    }

    fn closed(code: u16) -> StreamEnd {
        StreamEnd::Closed { code: Some(CloseCode::from(code)), reason: String::new() }
    }

    #[test]
    fn restart_keepalive_and_drop_reconnect() {
        for end in [
            closed(1012),
            closed(1011),
            closed(1002),
            StreamEnd::Dropped("reset".to_owned()),
            StreamEnd::Idle,
        ] {
            assert_eq!(Next::after_stream_end(&end), Next::Reconnect, "{end:?}");
        }
    }

    #[test]
    fn policy_close_switches_to_polling() {
        assert_eq!(Next::after_stream_end(&closed(1008)), Next::PollAndRetrySlowly);
    }

    #[test]
    fn shutdown_stops() {
        assert_eq!(Next::after_stream_end(&StreamEnd::Shutdown), Next::Stop);
    }

    #[test]
    fn refused_upgrade_switches_to_polling() {
        for status in [401, 403, 404] {
            assert_eq!(
                Next::after_connect_failure(&ConnectError::Rejected(status)),
                Next::PollAndRetrySlowly
            );
        }
        assert_eq!(Next::after_connect_failure(&ConnectError::Rejected(502)), Next::Reconnect);
        assert_eq!(Next::after_connect_failure(&ConnectError::Timeout), Next::Reconnect);
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
