//! Drover beside Restate 1.7.12, measured on the same box in the same run, in alternating
//! rounds: no-op steps/s of a 3-step workflow (Drover as in `throughput`; Restate as N calls
//! of a service whose handler journals three `ctx.run` no-op steps, at a few client
//! concurrencies, the best kept), and one workflow at a time, client start → result (Drover
//! as in `single`; Restate as sequential calls of the same handler).
//!
//! Restate and the service come from `bench/peer` (`npm ci --prefix bench/peer`): the
//! restate-server binary of `@restatedev/restate-server` and `bench/peer/service.mjs` under
//! Node. The server runs with its defaults, in its own temporary base directory, on free
//! loopback ports, TCP only, telemetry off.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::env::BenchEnv;
use crate::{Figure, Quantiles, Report, Unit, single, throughput};

/// The Restate version `bench/peer/package.json` pins.
const RESTATE_VERSION: &str = "1.7.12";

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Options {
    /// Rounds; each measures both systems, which one goes first alternating.
    #[arg(long, default_value_t = 3)]
    pub(crate) rounds: u32,
    /// Drover instances started at once per round (as `throughput`).
    #[arg(long, default_value_t = 10_000)]
    pub(crate) instances: u32,
    /// Drover worker processes (as `throughput`).
    #[arg(long, default_value_t = 2)]
    pub(crate) workers: usize,
    /// Restate calls per round and concurrency.
    #[arg(long, default_value_t = 5000)]
    pub(crate) invocations: u32,
    /// Restate client concurrencies tried each round (calls in flight at once).
    #[arg(long, value_delimiter = ',', default_value = "128,512,2048,4096")]
    pub(crate) concurrency: Vec<usize>,
    /// Node processes serving the Restate service (node:cluster on one port).
    #[arg(long, default_value_t = 2)]
    pub(crate) service_processes: usize,
    /// One-at-a-time runs per round and system, after the warm-up.
    #[arg(long, default_value_t = 300)]
    pub(crate) runs: u32,
    /// One-at-a-time runs per round and system before measuring.
    #[arg(long, default_value_t = 50)]
    pub(crate) warmup: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            rounds: 3,
            instances: 10_000,
            workers: 2,
            invocations: 5000,
            concurrency: vec![128, 512, 2048, 4096],
            service_processes: 2,
            runs: 300,
            warmup: 50,
        }
    }
}

fn peer_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peer")
}

/// The restate-server binary npm installed for this platform.
fn server_bin() -> PathBuf {
    let os = match std::env::consts::OS {
        "macos" => "darwin",
        os => os,
    };
    let arch = match std::env::consts::ARCH {
        "x86_64" => "x64",
        "aarch64" => "arm64",
        arch => arch,
    };
    peer_dir().join(format!(
        "node_modules/@restatedev/restate-server-{os}-{arch}/bin/restate-server"
    ))
}

/// Whether `bench/peer` has been installed (the server binary and the SDK are there).
pub(crate) fn installed() -> bool {
    server_bin().is_file()
        && peer_dir()
            .join("node_modules/@restatedev/restate-sdk")
            .is_dir()
}

fn ensure_installed() -> anyhow::Result<()> {
    anyhow::ensure!(
        installed(),
        "Restate is not installed: run `npm ci --prefix bench/peer` (Node >= 20 and npm; \
         fetches @restatedev/restate-server {RESTATE_VERSION} and the TypeScript SDK). \
         Looked for {}",
        server_bin().display()
    );
    Ok(())
}

/// `n` distinct free loopback ports (all bound at once, then released).
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let sockets = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    sockets.iter().map(|s| Ok(s.local_addr()?.port())).collect()
}

/// The last `n` lines of a log file, for error messages.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Calls of `noop3/run` through Restate's HTTP ingress.
#[derive(Clone)]
struct Ingress {
    http: reqwest::Client,
    url: String,
}

impl Ingress {
    /// One call: answered when the invocation has ended, with its result.
    ///
    /// A request the client could not get through (a connection that timed out while the
    /// request was written, as one of thousands at once here sometimes does) is sent again,
    /// up to 5 times; its time includes the retries. (No `idempotency-key`: that would make
    /// Restate keep every invocation's result, which is not the load measured.)
    async fn call(&self) -> anyhow::Result<()> {
        let mut attempt = 0;
        let answer = loop {
            attempt += 1;
            match self.http.post(&self.url).send().await {
                Ok(answer) => break answer,
                Err(err) if attempt < 5 && (err.is_connect() || err.is_request()) => {
                    tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
                }
                Err(err) => return Err(err.into()),
            }
        };
        let status = answer.status();
        let body = answer.text().await?;
        anyhow::ensure!(
            status.is_success() && body == "\"done\"",
            "Restate answered {status}: {body}"
        );
        Ok(())
    }
}

/// A running restate-server with the 3-step service registered; both processes are killed
/// when it is dropped.
struct Restate {
    server: Child,
    service: Child,
    dir: PathBuf,
    version: String,
    ingress: Ingress,
}

impl Restate {
    async fn start(service_processes: usize) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "drover-bench-restate-{}-{}",
            std::process::id(),
            chrono::Utc::now().timestamp_millis()
        ));
        std::fs::create_dir_all(&dir)?;
        let [fabric, admin, ingress, service_port]: [u16; 4] = free_ports(4)?
            .try_into()
            .map_err(|_| anyhow::anyhow!("four ports"))?;
        let server_log = dir.join("server.log");
        let server = Command::new(server_bin())
            .arg("--base-dir")
            .arg(dir.join("data"))
            .args(["--node-name", "bench", "--no-logo", "--listen-mode", "tcp"])
            .env("RESTATE_BIND_ADDRESS", format!("127.0.0.1:{fabric}"))
            .env("RESTATE_ADMIN__BIND_ADDRESS", format!("127.0.0.1:{admin}"))
            .env(
                "RESTATE_INGRESS__BIND_ADDRESS",
                format!("127.0.0.1:{ingress}"),
            )
            .env("RESTATE_DISABLE_TELEMETRY", "true")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&server_log)?)
            .stderr(std::fs::File::create(dir.join("server.err"))?)
            .kill_on_drop(true)
            .spawn()
            .context("spawning restate-server")?;
        let service_log = dir.join("service.log");
        // node:cluster workers exit when their primary does.
        let service = Command::new("node")
            .arg(peer_dir().join("service.mjs"))
            .current_dir(peer_dir())
            .env("PORT", service_port.to_string())
            .env("PROCESSES", service_processes.to_string())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&service_log)?)
            .stderr(std::fs::File::create(dir.join("service.err"))?)
            .kill_on_drop(true)
            .spawn()
            .context("spawning `node bench/peer/service.mjs` (is Node on PATH?)")?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        let mut me = Self {
            server,
            service,
            dir,
            version: String::new(),
            ingress: Ingress {
                http: http.clone(),
                url: format!("http://127.0.0.1:{ingress}/noop3/run"),
            },
        };
        let admin = format!("http://127.0.0.1:{admin}");

        // The admin API answers, the deployment registers, a call goes through.
        let deadline = Instant::now() + Duration::from_secs(120);
        me.version = me
            .retry(deadline, "Restate's admin API to answer", || async {
                let r = http
                    .get(format!("{admin}/version"))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if !r.status().is_success() {
                    return Err(r.status().to_string());
                }
                let v: Value = r.json().await.map_err(|e| e.to_string())?;
                Ok(v["version"].as_str().unwrap_or_default().to_owned())
            })
            .await?;
        me.retry(deadline, "the deployment to register", || async {
            let r = http
                .post(format!("{admin}/deployments"))
                .json(&json!({ "uri": format!("http://127.0.0.1:{service_port}"), "force": true }))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            let status = r.status();
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("{status}: {}", r.text().await.unwrap_or_default()))
            }
        })
        .await?;
        let ingress = me.ingress.clone();
        me.retry(deadline, "a call to go through", || async {
            ingress.call().await.map_err(|e| e.to_string())
        })
        .await?;
        Ok(me)
    }

    /// Tries `attempt` every 100 ms until it succeeds, while both processes run, until
    /// `deadline`; a timeout names `what`, the last failure and the server log's tail.
    async fn retry<T, F, Fut>(
        &mut self,
        deadline: Instant,
        what: &str,
        mut attempt: F,
    ) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, String>>,
    {
        loop {
            self.check_alive()?;
            let last = match attempt().await {
                Ok(value) => return Ok(value),
                Err(why) => why,
            };
            anyhow::ensure!(
                Instant::now() < deadline,
                "timed out waiting for {what} ({last}); server log:\n{}",
                tail(&self.dir.join("server.err"), 20)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.server.try_wait()? {
            anyhow::bail!(
                "restate-server exited ({status}):\n{}",
                tail(&self.dir.join("server.err"), 20)
            );
        }
        if let Some(status) = self.service.try_wait()? {
            anyhow::bail!(
                "the Restate service exited ({status}):\n{}",
                tail(&self.dir.join("service.err"), 20)
            );
        }
        Ok(())
    }

    /// `n` calls, `concurrency` at a time: the time from the first call to the last answer.
    async fn burst(&mut self, n: u32, concurrency: usize) -> anyhow::Result<Duration> {
        let next = Arc::new(AtomicU32::new(0));
        let started = Instant::now();
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let ingress = self.ingress.clone();
                let next = next.clone();
                tokio::spawn(async move {
                    while next.fetch_add(1, Ordering::Relaxed) < n {
                        ingress.call().await?;
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        for task in tasks {
            task.await??;
        }
        let elapsed = started.elapsed();
        self.check_alive()?;
        Ok(elapsed)
    }

    /// `warmup + runs` calls one after the other: the last `runs`' call → result times, ms.
    async fn one_at_a_time(&mut self, warmup: u32, runs: u32) -> anyhow::Result<Vec<f64>> {
        let mut ms = Vec::with_capacity(runs as usize);
        for i in 0..warmup + runs {
            let started = Instant::now();
            self.ingress.call().await?;
            if i >= warmup {
                ms.push(started.elapsed().as_secs_f64() * 1000.0);
            }
        }
        Ok(ms)
    }

    fn server_rss_mib(&self) -> Option<f64> {
        let pid = self.server.id()?;
        Some(crate::memory::rss_bytes(pid).ok()? as f64 / (1024.0 * 1024.0))
    }

    /// Kills both processes, waits for them, and removes the base directory (kept with
    /// `DROVER_BENCH_KEEP`).
    async fn stop(mut self) {
        let _ = self.service.kill().await;
        let _ = self.server.kill().await;
        if std::env::var_os("DROVER_BENCH_KEEP").is_some() {
            eprintln!("kept Restate's directory {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<Report> {
    ensure_installed()?;
    anyhow::ensure!(
        !options.concurrency.is_empty() && options.rounds > 0,
        "no concurrency or no rounds"
    );
    eprintln!("starting restate-server and the service…");
    let mut restate = Restate::start(options.service_processes).await?;
    let result = measure(&mut restate, options).await;
    if result.is_err() {
        eprintln!(
            "Restate's logs: {} (kept)",
            restate.dir.join("server.err").display()
        );
    } else {
        restate.stop().await;
    }
    result
}

async fn drover_throughput(options: &Options) -> anyhow::Result<f64> {
    let env = BenchEnv::new().await?;
    let burst = throughput::burst(&env, "noop3", options.instances, options.workers).await;
    env.cleanup().await;
    Ok(crate::rate(
        u64::from(options.instances) * 3,
        burst?.elapsed,
    ))
}

async fn drover_one_at_a_time(options: &Options) -> anyhow::Result<Vec<f64>> {
    let env = BenchEnv::new().await?;
    let ms = single::one_at_a_time(&env, "single", options.warmup, options.runs).await;
    env.cleanup().await;
    ms
}

async fn measure(restate: &mut Restate, options: &Options) -> anyhow::Result<Report> {
    let version = restate.version.clone();
    eprintln!("Restate {version} answers; warming up…");
    restate.burst(1000, 32).await?;

    // (round, concurrency, steps/s) for Restate; (round, steps/s) for Drover.
    let mut restate_rates: Vec<(u32, usize, f64)> = Vec::new();
    let mut drover_rates: Vec<(u32, f64)> = Vec::new();
    let mut restate_ms = Vec::new();
    let mut drover_ms = Vec::new();
    for round in 0..options.rounds {
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for restate_turn in order {
            if restate_turn {
                for &c in &options.concurrency {
                    eprintln!(
                        "round {round}: Restate, {} calls, {c} at a time…",
                        options.invocations
                    );
                    let elapsed = restate.burst(options.invocations, c).await?;
                    let rate = crate::rate(u64::from(options.invocations) * 3, elapsed);
                    eprintln!("  {rate:.0} steps/s");
                    restate_rates.push((round, c, rate));
                }
            } else {
                eprintln!("round {round}: Drover, {} instances…", options.instances);
                let rate = drover_throughput(options).await?;
                eprintln!("  {rate:.0} steps/s");
                drover_rates.push((round, rate));
            }
        }
        for restate_turn in order {
            if restate_turn {
                eprintln!("round {round}: Restate, one call at a time…");
                restate_ms.extend(restate.one_at_a_time(options.warmup, options.runs).await?);
            } else {
                eprintln!("round {round}: Drover, one workflow at a time…");
                drover_ms.extend(drover_one_at_a_time(options).await?);
            }
        }
    }
    let rss = restate.server_rss_mib();

    let (best_c, restate_best) = restate_rates
        .iter()
        .map(|&(_, c, r)| (c, r))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or_default();
    let drover_best = drover_rates.iter().map(|&(_, r)| r).fold(0.0_f64, f64::max);
    let restate_q = Quantiles::of(&restate_ms);
    let drover_q = Quantiles::of(&drover_ms);

    println!();
    println!(
        "{:<62} {:>12}",
        "no-op steps/s of a 3-step workflow", "steps/s"
    );
    for &(round, c, r) in &restate_rates {
        println!(
            "{:<62} {:>10.0}/s",
            format!(
                "round {round}: Restate {version}, {} calls, {c} at a time",
                options.invocations
            ),
            r
        );
    }
    for &(round, r) in &drover_rates {
        println!(
            "{:<62} {:>10.0}/s",
            format!(
                "round {round}: Drover, {} instances at once, {} workers",
                options.instances, options.workers
            ),
            r
        );
    }
    println!();
    for (name, q) in [
        (format!("Restate {version}, call → result"), restate_q),
        ("Drover, start → result (?wait=30s)".to_owned(), drover_q),
    ] {
        println!(
            "{:<62} p50 {:>6.2} ms  p99 {:>6.2} ms  (n = {})",
            format!("one at a time: {name}"),
            q.p50,
            q.p99,
            q.n
        );
    }
    if let Some(rss) = rss {
        println!("{:<62} {rss:>9.1} MiB", "restate-server RSS at the end");
    }

    let restate_name = format!("Restate {version}");
    Ok(Report {
        figures: vec![
            Figure::new(
                format!(
                    "no-op steps/s, 3-step workflows, {} workers, best of {} rounds",
                    options.workers, options.rounds
                ),
                drover_best,
                Unit::PerSecond,
                format!("{restate_name} best ({best_c} calls at a time)"),
                restate_best,
            ),
            Figure::new(
                "one workflow at a time, start → result p50",
                drover_q.p50,
                Unit::Millis,
                format!("{restate_name} p50"),
                restate_q.p50,
            ),
            Figure::new(
                "one workflow at a time, start → result p99",
                drover_q.p99,
                Unit::Millis,
                format!("{restate_name} p99"),
                restate_q.p99,
            ),
        ],
        json: json!({
            "restate_version": version,
            "rounds": options.rounds,
            "service_processes": options.service_processes,
            "restate_throughput": restate_rates.iter().map(|&(round, c, r)| json!({
                "round": round, "concurrency": c, "calls": options.invocations, "steps_per_s": r,
            })).collect::<Vec<_>>(),
            "drover_throughput": drover_rates.iter().map(|&(round, r)| json!({
                "round": round, "instances": options.instances, "workers": options.workers,
                "steps_per_s": r,
            })).collect::<Vec<_>>(),
            "restate_best_steps_per_s": restate_best,
            "drover_best_steps_per_s": drover_best,
            "restate_one_at_a_time": restate_q.to_json(),
            "drover_one_at_a_time": drover_q.to_json(),
            "restate_server_rss_mib": rss,
        }),
    })
}
