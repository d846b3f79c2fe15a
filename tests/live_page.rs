//! The Live Events page in a real headless Chromium, driven over W3C WebDriver (`chromedriver`):
//! the seed's test step, "confirm the event was delivered with a 200 response status".
//!
//! Needs `chromium` and `chromedriver` (Debian's `chromium` and `chromium-driver`; `scripts/test`
//! installs them). `CHROMIUM` and `CHROMEDRIVER` override where they are. Without them the test
//! fails: it is not skipped.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod common;

use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use lytics_relay::integration::Secret;
use lytics_relay::proto::v1 as pb;
use lytics_relay::telemetry::Telemetry;
use serde_json::{Value, json};

const ADMIN: &str = "admin-secret-for-the-browser";

fn binary(var: &str, default: &str) -> String {
    let path = std::env::var(var).unwrap_or_else(|_| default.to_string());
    assert!(
        std::path::Path::new(&path).exists(),
        "`{path}` is missing: install Debian's chromium and chromium-driver (./scripts/test does), or set {var}"
    );
    path
}

/// A chromedriver process on a loopback port, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    /// Starts chromedriver on a free port; tries again on a fresh port when it exits at once
    /// (the port was taken between picking and binding it by a test running in parallel).
    async fn start() -> Driver {
        let bin = binary("CHROMEDRIVER", "/usr/bin/chromedriver");
        let mut attempts = 0;
        'spawn: loop {
            attempts += 1;
            let port = StdListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = Command::new(&bin)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("chromedriver starts");
            let mut driver = Driver {
                child,
                url: format!("http://127.0.0.1:{port}"),
            };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(r) = reqwest::get(format!("{}/status", driver.url)).await
                    && let Ok(v) = r.json::<Value>().await
                    && v["value"]["ready"] == json!(true)
                {
                    return driver;
                }
                if driver.child.try_wait().unwrap().is_some() && attempts < 5 {
                    continue 'spawn;
                }
                assert!(Instant::now() < deadline, "chromedriver never became ready");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One browser session: just the WebDriver commands the test needs.
struct Browser {
    http: reqwest::Client,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn open(driver: &Driver) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([format!("--user-data-dir={}", profile.path().display())])
        .collect::<Vec<_>>();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": binary("CHROMIUM", "/usr/bin/chromium"), "args": args}
        }}});
        let http = reqwest::Client::new();
        let r: Value = http
            .post(format!("{}/session", driver.url))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {r}"))
            .to_string();
        Browser {
            http,
            session: format!("{}/session/{session}", driver.url),
            _profile: profile,
        }
    }

    async fn command(&self, path: &str, body: Value) -> Value {
        let r: Value = self
            .http
            .post(format!("{}/{path}", self.session))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(
            r["value"].get("error").is_none(),
            "WebDriver `{path}` failed: {r}"
        );
        r["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.command("url", json!({ "url": url })).await;
    }

    /// Runs `script` in the page and returns what it returns.
    async fn eval(&self, script: &str) -> Value {
        self.command("execute/sync", json!({"script": script, "args": []}))
            .await
    }

    /// Polls `script` until it returns something other than null or false.
    async fn wait_for(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.eval(script).await;
            if !v.is_null() && v != json!(false) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; the page shows:\n{}",
                self.eval("return document.body.innerText").await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn close(self) {
        let _ = self.http.delete(&self.session).send().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_page_shows_an_event_delivered_with_a_200() {
    let emu = EmulatorHandle::start().await;
    let (mut settings, _dir) = settings(&emu.url(), TOKEN);
    settings.admin_token = Some(Secret::new(ADMIN));
    let relay = RelayHandle::start(settings, Telemetry::disabled()).await;
    let driver = Driver::start().await;
    let browser = Browser::open(&driver).await;

    browser
        .goto(&relay.http_url(&format!("/live?token={ADMIN}")))
        .await;
    browser
        .wait_for(
            "the page to connect",
            "return document.getElementById('state').textContent === 'live'",
        )
        .await;

    relay
        .client()
        .await
        .send(pb::SendRequest {
            event: Some(event(json!({
                "type": "track", "event": "Order Completed", "userId": "user_98765",
                "messageId": "m-browser", "properties": {"order_id": "o-1", "revenue": 79.99}
            }))),
        })
        .await
        .unwrap();

    let status = browser
        .wait_for(
            "the delivered row",
            r#"const row = document.querySelector('tr[data-event-id="m-browser"][data-outcome="delivered"]');
               return row && row.querySelector('td.status').textContent;"#,
        )
        .await;
    assert_eq!(status, json!("200"), "delivered with a 200 response status");

    // Newest first: the delivered row is above the accepted one, which holds the input and
    // the mapped record as JSON.
    let rows = browser
        .eval(
            r#"return [...document.querySelectorAll('tr[data-event-id="m-browser"]')].map(r => r.dataset.outcome)"#,
        )
        .await;
    assert_eq!(rows, json!(["delivered", "accepted"]));
    let details = browser
        .eval(
            r#"const row = document.querySelector('tr[data-event-id="m-browser"][data-outcome="accepted"]');
               return [...row.querySelectorAll('details pre')].map(p => JSON.parse(p.textContent))"#,
        )
        .await;
    assert_eq!(details[0]["event"], json!("Order Completed"), "the input");
    assert_eq!(details[1]["_e"], json!("Order Completed"), "the mapped record");
    assert_eq!(details[1]["order_id"], json!("o-1"));
    let text = browser.eval("return document.body.innerText").await;
    assert!(
        !text.as_str().unwrap().contains(ADMIN),
        "the page never shows the token"
    );

    browser.close().await;
}
