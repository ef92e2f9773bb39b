//! The browser app end to end: the whole platform as real processes (two
//! gateways, each allowing its own origin, since the page is served by the
//! gateway it talks to), and `tests/browser/chat.test.mjs` driving Debian's
//! headless Chromium through playwright-core (see that file for what it
//! checks). Screenshots land in `target/browser-artifacts/`.
//!
//! Needs `/usr/bin/chromium` and `tests/browser/node_modules`:
//! `tests/browser/setup.sh` installs both (`make test` runs it). Without
//! them this test fails and says so; it never passes without running.

use chat_tests::platform::{Options, Platform};
use chat_tests::repo_root;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browsers_chat_through_offline_reload_and_a_group_of_three() {
    let dir = repo_root().join("tests/browser");
    let chromium = std::env::var("CHAT_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists() && dir.join("node_modules/playwright-core").exists(),
        "the browser test needs {chromium} and tests/browser/node_modules: run tests/browser/setup.sh \
         (make test does)"
    );
    let p = Platform::start_with(
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
    let mut node = tokio::process::Command::new("node");
    node.arg("chat.test.mjs")
        .current_dir(&dir)
        .env("CHAT_GW0", format!("http://{}", p.gateway(0)))
        .env("CHAT_GW1", format!("http://{}", p.gateway(1)))
        .env("CHAT_ARTIFACTS", &artifacts)
        .env("CHAT_CHROMIUM", &chromium)
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(400), node.output())
        .await
        .expect("the browser test did not finish in 400 s")
        .expect("cannot run node: is Node.js 20+ installed?");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    p.stop().await;
    assert!(
        out.status.success(),
        "the browser test failed ({}); output above, screenshots in {}",
        out.status,
        artifacts.display()
    );
}
