//! The browser app end to end: the whole platform as real processes (two
//! gateways, each allowing its own origin, since the page is served by the
//! gateway it talks to), and `tests/browser/chat.test.mjs` driving Debian's
//! headless Chromium through playwright-core (see that file for what it
//! checks). Screenshots land in `target/browser-artifacts/`.
//!
//! The script asks this test to act on the platform with lines on its
//! stdout, answered with `done` on its stdin:
//! `@@control kill-gateway <i>` (SIGKILL) and `@@control restart-gateway <i>`.
//!
//! Needs `/usr/bin/chromium` and `tests/browser/node_modules`:
//! `tests/browser/setup.sh` installs both (`make test` runs it). Without
//! them this test fails and says so; it never passes without running.

use chat_tests::platform::{Options, Platform, Role};
use chat_tests::repo_root;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browsers_chat_through_offline_reload_a_dead_gateway_and_a_group_of_three() {
    let dir = repo_root().join("tests/browser");
    let chromium = std::env::var("CHAT_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists() && dir.join("node_modules/playwright-core").exists(),
        "the browser test needs {chromium} and tests/browser/node_modules: run tests/browser/setup.sh \
         (make test does)"
    );
    let mut p = Platform::start_with(
        "browser",
        Options {
            gateways: 2,
            workers: 1,
            gateway_env: vec![("CHAT_ALLOWED_ORIGINS".into(), "http://{listen}".into())],
            ..Options::default()
        },
    )
    .await
    .unwrap();
    let artifacts = repo_root().join("target/browser-artifacts");
    // CHAT_BROWSER_SCRIPT runs another script against the same platform (debugging).
    let script = std::env::var("CHAT_BROWSER_SCRIPT").unwrap_or_else(|_| "chat.test.mjs".into());
    let mut node = tokio::process::Command::new("node")
        .arg(&script)
        .current_dir(&dir)
        .env("CHAT_GW0", format!("http://{}", p.gateway(0)))
        .env("CHAT_GW1", format!("http://{}", p.gateway(1)))
        .env("CHAT_ARTIFACTS", &artifacts)
        .env("CHAT_CHROMIUM", &chromium)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("cannot run node: is Node.js 20+ installed?");
    let mut stdin = node.stdin.take().unwrap();
    let mut lines = BufReader::new(node.stdout.take().unwrap()).lines();
    let run = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            println!("{line}");
            let Some(control) = line.strip_prefix("@@control ") else {
                continue;
            };
            let words: Vec<&str> = control.split_whitespace().collect();
            match words.as_slice() {
                ["kill-gateway", i] => p.kill(Role::Gateway, i.parse().unwrap()),
                ["restart-gateway", i] => {
                    p.restart(Role::Gateway, i.parse().unwrap()).await.unwrap()
                }
                other => panic!("unknown control line {other:?}"),
            }
            stdin.write_all(b"done\n").await.unwrap();
            stdin.flush().await.unwrap();
        }
        node.wait().await.unwrap()
    };
    let status = tokio::time::timeout(Duration::from_secs(400), run)
        .await
        .expect("the browser test did not finish in 400 s");
    p.stop().await;
    assert!(
        status.success(),
        "the browser test failed ({status}); output above, screenshots in {}",
        artifacts.display()
    );
}
