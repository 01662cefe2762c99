//! Debian's headless Chromium driven over the Chrome DevTools Protocol on a
//! pipe (`--remote-debugging-pipe`: commands go in on the browser's fd 3,
//! answers and events come out on its fd 4, each one JSON message ended by
//! a NUL byte). No websocket and no client crate: serde_json is enough.
//! Real time, unlike `--virtual-time-budget`: the benchmarks time the stats
//! page with it, and a test watches a page stay open while its poll
//! updates it.
use std::{
    collections::VecDeque,
    fs::File,
    io::{self, BufRead as _, BufReader, PipeWriter, Write as _},
    os::{
        fd::{AsRawFd as _, RawFd},
        unix::process::CommandExt as _,
    },
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

/// Headless Chromium with nothing of its own to do: no GPU, no sandbox
/// (root), no network of its own, no first-run or background work. Every
/// browser the tests and benchmarks start gets these, and a fresh
/// `--user-data-dir`.
pub const CHROMIUM_FLAGS: [&str; 7] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
];

/// How long one command (or one awaited promise) may take.
const TIMEOUT: Duration = Duration::from_secs(120);

/// One headless Chromium on a fresh profile, attached to its first tab.
pub struct Browser {
    child: Child,
    to: PipeWriter,
    from: mpsc::Receiver<Value>,
    id: u64,
    /// The tab's session (flat mode): page commands carry it.
    session: Option<String>,
    /// Events that arrived while waiting for something else.
    events: VecDeque<Value>,
    profile: tempfile::TempDir,
}

impl Browser {
    /// Starts `chromium` with the flags of the tests (no GPU, no network of
    /// its own, a fresh `--user-data-dir`) and a window of `size` ("W,H").
    pub fn start(chromium: &Path, size: &str) -> anyhow::Result<Self> {
        let profile = tempfile::tempdir().context("creating a profile directory for Chromium")?;
        let log = File::create(profile.path().join("chromium.log"))
            .context("creating Chromium's log file")?;
        let (cmd_r, cmd_w) = io::pipe().context("creating the DevTools command pipe")?;
        let (ev_r, ev_w) = io::pipe().context("creating the DevTools event pipe")?;
        let mut c = Command::new(chromium);
        c.args(CHROMIUM_FLAGS)
            .arg("--remote-debugging-pipe")
            .arg(format!("--window-size={size}"))
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let (r, w) = (cmd_r.as_raw_fd(), ev_w.as_raw_fd());
        // SAFETY: between fork and exec the closure calls only fcntl and
        // dup2 (async-signal-safe) on fds that stay open until spawn returns
        // (cmd_r and ev_w are dropped after it), and allocates nothing.
        unsafe { c.pre_exec(move || devtools_fds(r, w)) };
        let child = c
            .spawn()
            .with_context(|| format!("starting {}", chromium.display()))?;
        // The browser holds its ends now.
        drop((cmd_r, ev_w));
        let (tx, from) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(ev_r);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                if let Ok(v) = serde_json::from_slice::<Value>(&buf)
                    && tx.send(v).is_err()
                {
                    break;
                }
            }
        });
        let mut b = Self {
            child,
            to: cmd_w,
            from,
            id: 0,
            session: None,
            events: VecDeque::new(),
            profile,
        };
        let targets = b.browser_call("Target.getTargets", json!({}))?;
        let tab = targets["targetInfos"]
            .as_array()
            .and_then(|ts| ts.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["targetId"].as_str())
            .map(str::to_owned);
        let tab = match tab {
            Some(t) => t,
            None => {
                b.browser_call("Target.createTarget", json!({"url": "about:blank"}))?["targetId"]
                    .as_str()
                    .context("Target.createTarget returned no targetId")?
                    .to_owned()
            }
        };
        let s = b.browser_call(
            "Target.attachToTarget",
            json!({"targetId": tab, "flatten": true}),
        )?;
        b.session = Some(
            s["sessionId"]
                .as_str()
                .context("Target.attachToTarget returned no sessionId")?
                .to_owned(),
        );
        b.call("Page.enable", json!({}))?;
        Ok(b)
    }

    /// A command to the tab; its result.
    pub fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        let session = self.session.clone();
        self.send(session.as_deref(), method, params)
    }

    fn browser_call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.send(None, method, params)
    }

    fn send(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> anyhow::Result<Value> {
        self.id += 1;
        let id = self.id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = s.into();
        }
        let mut bytes = serde_json::to_vec(&msg)?;
        bytes.push(0);
        self.to
            .write_all(&bytes)
            .with_context(|| format!("sending {method} to Chromium{}", self.log_tail()))?;
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let v = self
                .recv(deadline)
                .with_context(|| format!("waiting for Chromium's answer to {method}"))?;
            if v["id"].as_u64() == Some(id) {
                if let Some(e) = v.get("error") {
                    bail!("Chromium refused {method}: {e}");
                }
                return Ok(v["result"].clone());
            }
            if v.get("method").is_some() {
                self.events.push_back(v);
            }
        }
    }

    fn recv(&mut self, deadline: Instant) -> anyhow::Result<Value> {
        match self
            .from
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(v) => Ok(v),
            Err(RecvTimeoutError::Timeout) => {
                bail!("no answer within {TIMEOUT:?}{}", self.log_tail())
            }
            Err(RecvTimeoutError::Disconnected) => {
                bail!("Chromium closed its DevTools pipe{}", self.log_tail())
            }
        }
    }

    /// The next event `method` of the tab (also one that came already).
    pub fn wait_event(&mut self, method: &str) -> anyhow::Result<Value> {
        if let Some(i) = self.events.iter().position(|e| e["method"] == method) {
            let e = self.events.remove(i).unwrap_or_default();
            return Ok(e["params"].clone());
        }
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let v = self
                .recv(deadline)
                .with_context(|| format!("waiting for {method}"))?;
            if v["method"] == method {
                return Ok(v["params"].clone());
            }
            if v.get("method").is_some() {
                self.events.push_back(v);
            }
        }
    }

    /// Loads `url` in the tab and waits for its load event.
    pub fn navigate(&mut self, url: &str) -> anyhow::Result<()> {
        self.events.clear();
        let r = self.call("Page.navigate", json!({"url": url}))?;
        if let Some(e) = r["errorText"].as_str() {
            bail!("Chromium could not load {url}: {e}");
        }
        self.wait_event("Page.loadEventFired")
            .with_context(|| format!("loading {url}"))?;
        Ok(())
    }

    /// Evaluates `expr` in the tab, awaits it if it is a promise, and
    /// returns its value (as JSON).
    pub fn eval(&mut self, expr: &str) -> anyhow::Result<Value> {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "awaitPromise": true, "returnByValue": true}),
        )?;
        if let Some(e) = r.get("exceptionDetails") {
            let what = e["exception"]["description"]
                .as_str()
                .map_or_else(|| e.to_string(), str::to_owned);
            bail!("evaluating {expr:?} in the page: {what}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// The end of Chromium's stderr, for an error message.
    fn log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.profile.path().join("chromium.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(5).collect();
        if lines.is_empty() {
            String::new()
        } else {
            let tail: Vec<&str> = lines.into_iter().rev().collect();
            format!(" (Chromium's log ends: {})", tail.join(" | "))
        }
    }
}

impl Drop for Browser {
    /// Asks the browser to close (it ends its renderers), waits a little,
    /// then kills it by PID if it is still there.
    fn drop(&mut self) {
        self.id += 1;
        let msg = json!({"id": self.id, "method": "Browser.close", "params": {}});
        if let Ok(mut bytes) = serde_json::to_vec(&msg) {
            bytes.push(0);
            let _ = self.to.write_all(&bytes);
        }
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// In the child between fork and exec: `r` becomes fd 3 (commands in) and
/// `w` fd 4 (answers out), without close-on-exec.
fn devtools_fds(r: RawFd, w: RawFd) -> io::Result<()> {
    // Out of the way of 3 and 4 first: a pipe end may already be one of
    // them. These copies are close-on-exec.
    let high = |fd: RawFd| {
        // SAFETY: fcntl on an open fd; async-signal-safe.
        let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n)
        }
    };
    let (r, w) = (high(r)?, high(w)?);
    for (from, to) in [(r, 3), (w, 4)] {
        // SAFETY: dup2 between open fds; async-signal-safe; the copy does
        // not inherit close-on-exec.
        if unsafe { libc::dup2(from, to) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
