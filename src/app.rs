//! The running gateway, assembled from its settings: spool, limiter, transport, one dispatcher per
//! account, the ingest and admin listeners. `main` and the tests start it the same way:
//! `app::start(settings) -> Running`, then `Running::stop` (or a signal) and `Running::wait`.
//!
//! Invariants: everything that must stop listens to one `Shutdown`; after it fires, ingest answers 503,
//! readiness fails, the servers finish their requests, each dispatcher lets its request in flight finish
//! and its ack commit, and the spool is closed last (what was not sent stays in it).

use crate::api::{self, AccountView, AdminState, AppState, ServeOptions};
use crate::clock::{Clock, SystemClock};
use crate::config::{LimiterBackend, Settings, SpoolBackend};
use crate::dispatch::{AccountStatus, DispatchSettings, Dispatcher};
use crate::limiter::{EmbeddedLimiter, Gcra, Limiter, RedisLimiter};
use crate::metrics::Metrics;
use crate::redis_store::durability::{self, Durability};
use crate::redis_store::Store;
use crate::shutdown::{Shutdown, Trigger};
use crate::spool::{
    DiskSpool, DiskSpoolOptions, Queue, RedisSpool, RedisSpoolOptions, Spool, SpoolError,
    SpoolStats,
};
use crate::upstream::{self, Credentials, Target, Transport};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::task::JoinSet;

/// redb's page cache: bounded so that memory stays small whatever the backlog.
const SPOOL_CACHE_BYTES: usize = 8 << 20;
/// How long a gateway whose spool stopped waits for its requests before it exits: nothing more can be
/// kept, and the supervisor's restart on the durable state is what brings it back.
const FATAL_STOP: std::time::Duration = std::time::Duration::from_secs(1);

/// A started gateway.
pub struct Running {
    pub ingest_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    trigger: Trigger,
    shutdown_timeout: std::time::Duration,
    servers: JoinSet<()>,
    dispatchers: JoinSet<()>,
    spool: Arc<dyn Spool>,
    /// The disk spool, when events wait in this process's files (closed last on the way out).
    disk: Option<Arc<DiskSpool>>,
    /// The Redis queue, when events wait there (what this replica holds is handed back on the way out).
    redis: Option<Arc<RedisSpool>>,
    accounts: Vec<String>,
    reloader: Arc<Reloader>,
}

/// Connections the admin listener keeps open at most (probes, scrapes, operators).
const ADMIN_MAX_CONNECTIONS: usize = 256;

/// How often the suppression list's file is looked at for changes.
const PRIVACY_WATCH: std::time::Duration = std::time::Duration::from_secs(2);

/// What a configuration reload (`SIGHUP`) replaces in place: the ingest and admin keys, every
/// account's X credentials, the suppression list (read again) and `privacy.honor_gpc`. Everything else
/// needs a restart.
pub struct Reloader {
    ingest: Arc<AppState>,
    admin: Arc<AdminState>,
    credentials: BTreeMap<String, Credentials>,
}

impl Reloader {
    /// Applies `settings` (already validated whole); answers what changed, for the log.
    pub fn apply(&self, settings: &Settings) -> Vec<String> {
        let mut changed = Vec::new();
        self.ingest.keys.replace(api::ingest_keys(&settings.server));
        self.admin.keys.replace(api::admin_keys(&settings.server));
        match self.ingest.privacy.reload(true, Some(&settings.privacy)) {
            Ok(Some(n)) => changed.push(format!("privacy.suppression_list_file ({n} entries)")),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "the suppression list does not load: keeping the current one")
            }
        }
        for (name, credentials) in &self.credentials {
            match settings.accounts.get(name) {
                Some(a) if credentials.replace(a.auth.clone()) => {
                    changed.push(format!("accounts.{name}.auth"))
                }
                Some(_) => {}
                None => {
                    tracing::warn!(account = %name, "the reloaded configuration has no such account: it keeps its credentials; removing an account needs a restart")
                }
            }
        }
        for name in settings.accounts.keys() {
            if !self.credentials.contains_key(name) {
                tracing::warn!(account = %name, "a new account needs a restart to be served");
            }
        }
        changed
    }
}

/// The spool and limiter the configuration asks for, and the Redis they share, if any.
struct Backends {
    spool: Arc<dyn Spool>,
    disk: Option<Arc<DiskSpool>>,
    limiter: Arc<dyn Limiter>,
    shared: Option<api::SharedState>,
}

async fn backends(settings: &Settings) -> Result<Backends, String> {
    let store = match &settings.redis.url {
        Some(url)
            if settings.spool.backend == SpoolBackend::Redis
                || settings.limiter.backend == LimiterBackend::Redis =>
        {
            Some(Store::open(url, &settings.redis.key_prefix)?)
        }
        _ => None,
    };
    let (spool, disk, redis_spool): (Arc<dyn Spool>, _, _) = match (&settings.spool.backend, &store)
    {
        (SpoolBackend::Redis, Some(store)) => {
            let redis = RedisSpool::open(
                store.clone(),
                RedisSpoolOptions {
                    accounts: settings.accounts.keys().cloned().collect(),
                    consumer: settings.redis.consumer.clone(),
                    claim_idle: settings.redis.claim_idle,
                    dedup_window: settings.delivery.dedup_window,
                    max_bytes: settings.spool.max_bytes,
                    max_dead_letters: settings.spool.max_dead_letters,
                },
            )
            .await;
            tracing::info!(consumer = %settings.redis.consumer, url = %settings.redis.url.as_ref().map(|u| u.redacted()).unwrap_or_default(), "events are queued in Redis, shared by every replica");
            (redis.clone(), None, Some(redis))
        }
        _ => {
            let disk = open_spool(settings)?;
            (disk.clone() as Arc<dyn Spool>, Some(disk), None)
        }
    };
    let limiter: Arc<dyn Limiter> = match (&settings.limiter.backend, &store, &disk) {
        (LimiterBackend::Redis, Some(store), _) => {
            RedisLimiter::start(store.clone(), budgets(settings)).await
        }
        (_, _, Some(disk)) => Arc::new(EmbeddedLimiter::new(budgets(settings), disk.limiter_state())),
        // Configuration validation makes a Redis spool come with the Redis limiter.
        _ => return Err("limiter.backend: the embedded limiter keeps its state in the disk spool; with spool.backend = \"redis\" use limiter.backend = \"redis\"".into()),
    };
    let shared = match store {
        Some(store) => {
            let durability = if redis_spool.is_some() {
                let d = durability::probe(&store).await;
                match &d {
                    Durability::Durable => tracing::info!("Redis fsyncs every write (appendonly yes, appendfsync always): a 202 means the events are on its disk"),
                    Durability::NotDurable(why) => tracing::warn!(why = %why, "Redis may lose acknowledged writes: a 202 does not mean the events are on disk"),
                    Durability::Unknown(why) => tracing::warn!(why = %why, "cannot tell whether Redis fsyncs every write (CONFIG GET refused or failed): a 202 may not mean the events are on disk"),
                }
                Some(d)
            } else {
                None
            };
            Some(api::SharedState {
                store,
                spool: redis_spool,
                durability,
                limiter: settings.limiter.backend == LimiterBackend::Redis,
            })
        }
        None => None,
    };
    Ok(Backends {
        spool,
        disk,
        limiter,
        shared,
    })
}

/// Opens the spool, starts every dispatcher and both listeners.
pub async fn start(settings: Settings) -> Result<Running, String> {
    if settings.upstream.sandbox {
        tracing::warn!(
            "sandbox mode: batches are built, validated and recorded, nothing is sent to X"
        );
    }
    let Backends {
        spool,
        disk,
        limiter,
        shared,
    } = backends(&settings).await?;
    let transport = upstream::from_settings(&settings.upstream)?;
    let accounts = settings.accounts.keys().map(String::as_str);
    let metrics = Arc::new(match &shared {
        Some(_) => Metrics::shared(accounts),
        None => Metrics::new(accounts),
    });
    let (trigger, shutdown) = Shutdown::new();
    let privacy = Arc::new(crate::privacy::Privacy::load(&settings.privacy)?);
    let state = Arc::new(AppState {
        rules: settings.mapping_rules(),
        spool: spool.clone(),
        keys: api::ingest_keys(&settings.server),
        privacy: privacy.clone(),
        max_body_bytes: settings.server.max_body_bytes,
        body_timeout: settings.server.body_timeout,
        max_events_per_request: settings.server.max_events_per_request,
        body_budget: api::body_budget::BodyBudget::new(settings.server.max_inflight_body_bytes),
        shutdown: shutdown.clone(),
        now: chrono::Utc::now,
        metrics: metrics.clone(),
    });

    let ingest = bind("server.listen", settings.server.listen).await?;
    let admin = bind("server.admin_listen", settings.server.admin_listen).await?;
    let ingest_addr = ingest.local_addr().map_err(|e| e.to_string())?;
    let admin_addr = admin.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(ingest = %ingest_addr, admin = %admin_addr, "listening");

    let parts = Parts {
        spool: spool.clone(),
        limiter: limiter.clone(),
        transport,
        clock: Arc::new(SystemClock),
        metrics: metrics.clone(),
    };
    let (dispatchers, views, credentials) = start_dispatchers(&settings, &parts, &shutdown);
    let redis_queue = shared.as_ref().and_then(|s| s.spool.clone());
    let admin_state = Arc::new(AdminState {
        app: state.clone(),
        keys: api::admin_keys(&settings.server),
        accounts: views,
        limiter,
        ready_requires_spool: settings.server.ready_requires_spool,
        shared,
    });
    let connections = (settings.server.max_connections + ADMIN_MAX_CONNECTIONS) as u64;
    if let Some(warning) = crate::fd_limit::check(connections) {
        tracing::warn!("{warning}");
    }
    let mut servers = JoinSet::new();
    let serve = |listener, nodelay, max_connections| ServeOptions {
        header_timeout: settings.server.header_timeout,
        idle_timeout: settings.server.idle_timeout,
        max_connections,
        listener,
        nodelay,
    };
    let refused = |listener: &'static str| {
        let metrics = metrics.clone();
        move || metrics.connection_refused(listener)
    };
    servers.spawn(api::serve(
        ingest,
        api::app(state.clone()),
        shutdown.clone(),
        serve("ingest", true, settings.server.max_connections),
        refused("ingest"),
    ));
    tokio::spawn(privacy.clone().watch(PRIVACY_WATCH, shutdown.clone()));
    let reloader = Arc::new(Reloader {
        ingest: state.clone(),
        admin: admin_state.clone(),
        credentials,
    });
    servers.spawn(api::serve(
        admin,
        api::admin_app(admin_state),
        shutdown.clone(),
        // Its own small room: probes and scrapes answer however many clients flood the ingest side.
        serve("admin", false, ADMIN_MAX_CONNECTIONS),
        refused("admin"),
    ));
    Ok(Running {
        ingest_addr,
        admin_addr,
        trigger,
        shutdown_timeout: settings.server.shutdown_timeout,
        servers,
        dispatchers,
        spool,
        disk,
        redis: redis_queue,
        accounts: settings.accounts.keys().cloned().collect(),
        reloader,
    })
}

impl Running {
    /// Runs until `signal` (a clean stop: `Ok`) or until the spool can no longer keep its promises
    /// (`Err(cause)`, within about a second: the process should exit non-zero, to be restarted on its
    /// durable state).
    pub async fn serve_until(
        mut self,
        signal: impl std::future::Future<Output = ()>,
    ) -> Result<(), String> {
        let fatal = self.spool.fatal();
        tokio::select! {
            _ = signal => {
                tracing::info!("shutdown requested: no new events accepted, in-flight requests finishing");
                self.stop();
                self.wait().await
            }
            cause = fatal => {
                tracing::error!(cause = %cause, "the spool can no longer keep events: refusing them and exiting, to be restarted on what is on disk");
                self.stop();
                self.shutdown_timeout = self.shutdown_timeout.min(FATAL_STOP);
                let _ = self.wait().await;
                Err(cause)
            }
        }
    }

    /// What a reload replaces (keys, credentials), to apply a configuration loaded again.
    pub fn reloader(&self) -> Arc<Reloader> {
        self.reloader.clone()
    }

    /// On every `SIGHUP`, loads the configuration again with `load` and applies its keys and
    /// credentials; a configuration that does not load or validate changes nothing (the error is logged).
    #[cfg(unix)]
    pub fn reload_on_sighup<F>(&self, load: F)
    where
        F: Fn() -> Result<Settings, crate::config::ConfigError> + Send + 'static,
    {
        let reloader = self.reloader();
        let mut stop = self.trigger.subscribe();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hangups) = signal(SignalKind::hangup()) else {
                tracing::warn!("cannot listen for SIGHUP: reloading keys and credentials is off");
                return;
            };
            loop {
                tokio::select! {
                    got = hangups.recv() => if got.is_none() { return },
                    _ = stop.wait_ref() => return,
                }
                match load() {
                    Ok(settings) => {
                        let changed = reloader.apply(&settings);
                        tracing::info!(credentials_replaced = ?changed, "SIGHUP: configuration reloaded; keys and credentials replaced (other settings need a restart)");
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "SIGHUP: the configuration does not load; keeping the current keys and credentials")
                    }
                }
            }
        });
    }

    /// Begins the shutdown: no new events accepted, requests in flight finish.
    pub fn stop(&self) {
        self.trigger.fire();
    }

    /// Stops the spool's storage thread as a bug would, for tests of the crash-only path.
    #[doc(hidden)]
    pub fn crash_storage_thread(&self) {
        if let Some(disk) = &self.disk {
            disk.crash_storage_thread();
        }
    }

    /// Waits for everything to finish after `stop` (at most `server.shutdown_timeout`), then closes the spool.
    pub async fn wait(mut self) -> Result<(), String> {
        let drained = tokio::time::timeout(self.shutdown_timeout, async {
            while self.servers.join_next().await.is_some() {}
            while self.dispatchers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "shutdown_timeout reached; stopping with work unfinished (it stays in the spool)"
            );
        }
        let left: usize = self.accounts.iter().map(|a| self.spool.backlog(a)).sum();
        let Some(disk) = self.disk.take() else {
            let handed_back = match &self.redis {
                Some(redis) => redis.release().await,
                None => 0,
            };
            tracing::info!(
                events_waiting = left,
                handed_back,
                "stopped; the events waiting in Redis go out through the other replicas (what this one held is handed back), or after the next start"
            );
            return Ok(());
        };
        let closed = disk.close().await;
        tracing::info!(
            events_waiting = left,
            "stopped; waiting events go out after the next start"
        );
        closed.map_err(|e| format!("closing the spool: {e}"))
    }
}

/// What every dispatcher shares.
struct Parts {
    spool: Arc<dyn Spool>,
    limiter: Arc<dyn Limiter>,
    transport: Arc<dyn Transport>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
}

fn open_spool(settings: &Settings) -> Result<Arc<DiskSpool>, String> {
    let disk = DiskSpool::open(DiskSpoolOptions {
        dir: settings.spool.dir.clone(),
        max_bytes: settings.spool.max_bytes,
        max_dead_letters: settings.spool.max_dead_letters,
        dedup_window: settings.delivery.dedup_window,
        cache_bytes: SPOOL_CACHE_BYTES,
        min_free_bytes: settings.spool.min_free_bytes,
    })
    .map_err(|e| match e {
        SpoolError::Unusable { .. } => format!(
            "{e}. Nothing was changed. `conversion-gateway spool check` (with the same --config) reports what is readable; `conversion-gateway spool salvage` moves the damaged files aside, never deleting them, and rebuilds the spool from every readable record"
        ),
        e => format!(
            "cannot open the spool in spool.dir {}: {e}",
            settings.spool.dir.display()
        ),
    })?;
    let waiting: usize = settings.accounts.keys().map(|a| disk.backlog(a)).sum();
    tracing::info!(dir = %settings.spool.dir.display(), waiting, bytes = disk.bytes(), "spool open");
    Ok(disk)
}

/// One GCRA per ad account (accounts of one ad account share it).
fn budgets(settings: &Settings) -> HashMap<String, Gcra> {
    settings
        .accounts
        .values()
        .map(|a| {
            let gcra = Gcra::new(
                a.rate_limit.events,
                a.rate_limit.window,
                settings.delivery.max_batch as u64,
            );
            (a.ad_account_id.clone(), gcra)
        })
        .collect()
}

fn start_dispatchers(
    settings: &Settings,
    parts: &Parts,
    shutdown: &Shutdown,
) -> (JoinSet<()>, Vec<AccountView>, BTreeMap<String, Credentials>) {
    let delivery = &settings.delivery;
    let dispatch_settings = DispatchSettings {
        max_batch: delivery.max_batch,
        max_batch_bytes: delivery.max_batch_bytes,
        linger: delivery.linger,
        max_event_age: delivery.max_event_age,
        retry_base: delivery.retry_base,
        retry_cap: delivery.retry_cap,
        pause_cap: delivery.pause_cap,
    };
    let mut tasks = JoinSet::new();
    let mut views = Vec::new();
    let mut credentials = BTreeMap::new();
    for (name, account) in &settings.accounts {
        let status: Arc<Mutex<AccountStatus>> = Default::default();
        views.push(AccountView {
            name: name.clone(),
            ad_account_id: account.ad_account_id.clone(),
            pixel_id: account.pixel_id.clone(),
            rate_limit_events: account.rate_limit.events,
            rate_limit_window: account.rate_limit.window,
            status: status.clone(),
        });
        let dispatcher = Dispatcher {
            target: Target {
                account: name.clone(),
                pixel_id: account.pixel_id.clone(),
                auth: credentials
                    .entry(name.clone())
                    .or_insert_with(|| Credentials::new(account.auth.clone()))
                    .clone(),
            },
            budget_key: account.ad_account_id.clone(),
            spool: parts.spool.clone(),
            transport: parts.transport.clone(),
            limiter: parts.limiter.clone(),
            clock: parts.clock.clone(),
            settings: dispatch_settings.clone(),
            status,
            metrics: parts.metrics.clone(),
        };
        tasks.spawn(dispatcher.run(shutdown.clone()));
    }
    (tasks, views, credentials)
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {key} {addr}: {e}"))
}
