//! The child side (node mode): a process running one elector and reporting on its stdout.

use std::io::Write as _;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::{Event, EventKind, NODE_ENV, NodeConfig, Order, PARENT_PIPE_ENV};
use tower_primary::role::{Role, RoleHandle, TermContext};
use tower_primary::{Elector, Lease};

/// Whether this process was started as a node (`TOWER_PRIMARY_TEST_NODE=1`).
#[must_use]
pub fn is_node_process() -> bool {
    std::env::var(NODE_ENV).is_ok_and(|v| v.trim() == "1")
}

/// The pid this process reports itself as: [`NODE_ID_ENV`](crate::host::NODE_ID_ENV) when set
/// (a node in a [simulated host](crate::host), whose own pid is one of its namespace), else its
/// own pid.
#[must_use]
pub fn reported_pid() -> u32 {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *PID.get_or_init(|| {
        std::env::var(crate::host::NODE_ID_ENV)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(std::process::id)
    })
}

/// Prints `kind` as a protocol line of this process, now, and flushes stdout.
pub fn emit(kind: EventKind) {
    let line = Event::now(kind).to_string();
    let mut out = std::io::stdout().lock();
    // A parent that went away is not this node's problem: it exits on stdin EOF.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Runs this process as a node configured by the environment (see the [module docs](crate::node)), and
/// exits: status 0 after a `SIGTERM` handover, 1 if the elector stopped by itself, 2 on a
/// configuration error, 3 when the parent's pipe closed.
///
/// Builds its own current-thread tokio runtime, so call it from plain synchronous code (a `#[test]`
/// function or `main` before any runtime exists). The process exits without dropping the runtime.
pub fn run_node_from_env() -> ! {
    let config = match NodeConfig::from_env() {
        Ok(c) => c,
        Err(message) => exit_node(2, Some(message)),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => exit_node(2, Some(format!("cannot build a tokio runtime: {e}"))),
    };
    let code = runtime.block_on(run_node(config));
    exit_node(code, None)
}

fn exit_node(code: i32, error: Option<String>) -> ! {
    if let Some(message) = error {
        emit(EventKind::Error { message });
    }
    emit(EventKind::Exit { code });
    std::process::exit(code)
}

/// Runs a node on the current runtime until `SIGTERM` (returns 0 after the handover) or until the
/// elector stops by itself (returns 1). Configuration errors are reported as an `error` line and
/// return 2. See [`run_node_from_env`], which also exits the process.
pub async fn run_node(config: NodeConfig) -> i32 {
    use tokio::signal::unix::{SignalKind, signal};

    // Before anything can make this node primary: a SIGTERM must always mean a handover.
    let mut sigterm = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            emit(EventKind::Error {
                message: format!("cannot install a SIGTERM handler: {e}"),
            });
            return 2;
        }
    };
    let (orders_tx, orders) = mpsc::unbounded_channel();
    if std::env::var(PARENT_PIPE_ENV).is_ok_and(|v| v.trim() == "1") {
        std::thread::spawn(move || read_orders_until_the_parent_is_gone(&orders_tx));
    }
    let backend = match tower_primary::backend::from_url(&config.backend) {
        Ok(b) => b,
        Err(e) => {
            emit(EventKind::Error {
                message: e.to_string(),
            });
            return 2;
        }
    };
    let mut builder = Elector::builder(config.lock.clone()).backend(backend);
    if std::env::var(crate::host::NODE_ID_ENV).is_ok() {
        // A simulated host shares this machine's host name: its pids (from 1 in each PID
        // namespace) would give two hosts' nodes one id. The pid it reports is unique.
        let host = tower_primary::NodeId::from_env().host().to_owned();
        builder = builder.node(tower_primary::NodeId::new(format!(
            "{host}:{}",
            reported_pid()
        )));
    }
    if let Some(lease) = config.lease {
        builder = builder.lease(Lease::new(lease));
    }
    if let Some(grace) = config.grace {
        builder = builder.grace(grace);
    }
    if let Some(settle) = config.settle {
        builder = builder.settle_time(settle);
    }
    if let Some(window) = config.window {
        builder = builder.handover_window(window);
    }
    if config.never_lead {
        builder = builder.never_lead();
    }
    builder = builder.ready_at_spawn(config.ready_at_spawn);
    let elector = match builder.spawn() {
        Ok(e) => e,
        Err(e) => {
            emit(EventKind::Error {
                message: e.to_string(),
            });
            return 2;
        }
    };
    emit(EventKind::Started);
    emit(EventKind::Node {
        id: elector.handle().node().id().to_owned(),
    });
    tokio::spawn(report_roles(elector.handle()));
    tokio::spawn(obey(elector.clone(), orders));
    let tick = config.tick.max(Duration::from_millis(1));
    let spawn = Arc::new(config.spawn);
    elector.singleton_task("node-tick", move |ctx: TermContext| {
        let spawn = spawn.clone();
        async move {
            tick_while_primary(ctx, tick, spawn.as_deref()).await;
            Ok::<(), std::convert::Infallible>(())
        }
    });
    if let Some((addr, every)) = config.witness {
        let node = reported_pid().to_string();
        tower_primary_testing::witness::write_while_primary(&elector, addr, node, every);
    }
    tokio::select! {
        _ = sigterm.recv() => {
            emit(EventKind::SigTerm);
            if let Some(bound) = config.drain_on_term {
                let _ = tokio::time::timeout(bound, elector.drain()).await;
            }
            elector.shutdown().await;
            emit(EventKind::Released);
            0
        }
        () = elector.stopped() => 1,
    }
}

async fn tick_while_primary(ctx: TermContext, tick: Duration, spawn: Option<&[String]>) {
    let term = ctx.term();
    // First, so that the line's timestamp is as close to the promotion as it can be.
    emit(EventKind::TaskStart { term });
    if let Some([program, args @ ..]) = spawn {
        // std's Command: the lock's descriptor is O_CLOEXEC, so the child must not keep the lock.
        match std::process::Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => emit(EventKind::ChildSpawned { pid: child.id() }),
            Err(e) => emit(EventKind::Error {
                message: format!("cannot spawn {program}: {e}"),
            }),
        }
    }
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    let mut n = 0;
    loop {
        tokio::select! {
            biased;
            () = ctx.cancelled() => {
                emit(EventKind::TaskCancelled { term });
                return;
            }
            _ = ticks.tick() => {
                // A step runs only under a live term: a node resumed past its deadline (SIGSTOP)
                // sees it ended before the elector has run.
                if !ctx.is_valid() {
                    ctx.cancelled().await;
                    emit(EventKind::TaskCancelled { term });
                    return;
                }
                n += 1;
                emit(EventKind::Tick { term, n });
            }
        }
    }
}

async fn report_roles(mut handle: RoleHandle) {
    let mut last: Option<EventKind> = None;
    loop {
        let kind = match handle.role() {
            Role::Starting => None,
            Role::Primary { term, .. } => Some(EventKind::Primary { term }),
            Role::Secondary { holder } => Some(EventKind::Secondary {
                holder_term: holder.as_ref().map(|h| h.term),
                holder_pid: holder.as_ref().map(|h| h.pid),
            }),
        };
        if let Some(kind) = kind
            && last.as_ref() != Some(&kind)
        {
            emit(kind.clone());
            last = Some(kind);
        }
        handle.changed().await;
    }
}

/// Reads the parent's [orders](Order), one a line, until the parent's end of the pipe closes;
/// then exits the process.
fn read_orders_until_the_parent_is_gone(orders: &mpsc::UnboundedSender<Order>) {
    use std::io::BufRead as _;
    // A plain thread: it blocks in read(2) until a line comes or the pipe closes.
    let stdin = std::io::stdin();
    let mut line = String::new();
    while matches!(stdin.lock().read_line(&mut line), Ok(n) if n > 0) {
        if let Some(order) = Order::parse(&line) {
            let _ = orders.send(order);
        }
        line.clear();
    }
    exit_node(3, Some("the parent's pipe closed".to_owned()));
}

/// Carries out the parent's orders, each in a task of its own (a drain waits for the handover).
async fn obey(elector: tower_primary::Elector, mut orders: mpsc::UnboundedReceiver<Order>) {
    while let Some(order) = orders.recv().await {
        let elector = elector.clone();
        tokio::spawn(async move {
            let result = match &order {
                Order::Ready => {
                    elector.ready();
                    Ok(())
                }
                Order::Drain => {
                    emit(EventKind::Obeyed {
                        order: order.clone(),
                    });
                    elector.drain().await;
                    emit(EventKind::Drained);
                    return;
                }
                Order::HandOverTo(node) => elector.hand_over_to(node.clone()).await,
                Order::StepDown => elector.step_down().await,
            };
            emit(match result {
                Ok(()) => EventKind::Obeyed { order },
                Err(e) => EventKind::Refused {
                    order,
                    message: e.to_string(),
                },
            });
        });
    }
}

/// A [`tracing_subscriber::Layer`] that turns the elector's "handing the lock over" log into a
/// [`HandingOver`](EventKind::HandingOver) line: the moment the old primary decided (the lock is
/// reserved for the successor). Add it to the node's subscriber, whatever its filter for the
/// other logs.
#[derive(Clone, Copy, Debug, Default)]
pub struct HandoverLayer;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for HandoverLayer {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        #[derive(Default)]
        struct Fields {
            message: String,
            term: Option<u64>,
            to: Option<String>,
        }
        impl tracing::field::Visit for Fields {
            fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
                if field.name() == "term" {
                    self.term = Some(value);
                }
            }
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                match field.name() {
                    "to" => self.to = Some(value.to_owned()),
                    "message" => value.clone_into(&mut self.message),
                    _ => {}
                }
            }
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                match field.name() {
                    "to" => self.to = Some(format!("{value:?}")),
                    "message" => self.message = format!("{value:?}"),
                    _ => {}
                }
            }
        }
        if event.metadata().target() != "tower_primary::elector" {
            return;
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        if fields.message == "handing the lock over"
            && let (Some(term), Some(to)) = (fields.term, fields.to)
        {
            emit(EventKind::HandingOver { term, to });
        }
    }
}
