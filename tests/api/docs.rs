//! The documentation, run as printed: every `sh` block of README.md and
//! docs/protocol.md in order, against a fresh server started as the README says (the
//! default SQLite file and demo data in its working directory), and the README's
//! WebSocket session replayed message by message. An example that drifts from the
//! server fails here.
//!
//! Conventions the documents follow: `localhost:8080` is the server (the test uses
//! another port); a comment `# expect: NNN` gives the HTTP status of the next `curl`
//! (else 2xx); `curl -N` streams are read for two seconds and must have started; in
//! a session, `…` stands for any value, and consecutive server lines may arrive in
//! any order.

use serde_json::Value;
use std::path::Path;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::helpers::*;

/// A server started as the README says, in a directory of its own.
struct Fresh {
    process: tokio::process::Child,
    dir: tempfile::TempDir,
    host: String,
}

async fn start_fresh() -> Fresh {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut process = tokio::process::Command::new(env!("CARGO_BIN_EXE_zonecast"))
        .args(["--bind", "127.0.0.1:0"])
        .current_dir(dir.path())
        .env_remove("ZONECAST_DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start zonecast");
    let stdout = process.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let base = within("the server to start", async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(url) = line.strip_prefix("  API docs:  ") {
                return url.trim_end_matches("/docs").to_owned();
            }
        }
        panic!("the server printed no address")
    })
    .await;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Fresh {
        process,
        dir,
        host: base.trim_start_matches("http://").to_owned(),
    }
}

fn doc(path: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The fenced blocks of `lang` in a Markdown text, in order.
fn blocks(text: &str, lang: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in text.lines() {
        let fence = line.trim_start();
        match &mut current {
            None if fence.starts_with("```") && fence.trim_start_matches('`') == lang => {
                current = Some(Vec::new());
            }
            Some(lines) if fence.starts_with("```") => {
                out.push(lines.join("\n"));
                current = None;
            }
            Some(lines) => lines.push(line),
            None => {}
        }
    }
    out
}

/// Wraps `curl` to check each documented call's status (see the module docs).
const WRAPPER: &str = r#"
__expect=2
curl() {
  local stream=0 a out rc code
  for a in "$@"; do [ "$a" = "-N" ] && stream=1; done
  if [ $stream = 1 ]; then
    out=$(command curl -sS --max-time 2 "$@"); rc=$?
    if [ $rc != 0 ] && [ $rc != 28 ]; then echo "FAILED (curl exit $rc): curl $*" >&2; exit 1; fi
    case "$out" in *retry:*) ;; *) echo "FAILED (no stream): curl $* -> $out" >&2; exit 1;; esac
  else
    out=$(command curl -w '\n%{http_code}' "$@") || { echo "FAILED (curl error): curl $*" >&2; exit 1; }
    code=${out##*$'\n'}
    out=${out%$'\n'*}
    case "$code" in
      ${__expect}*) ;;
      *) echo "FAILED (HTTP $code, documented ${__expect}xx): curl $* -> $out" >&2; exit 1;;
    esac
  fi
  __expect=2
  printf '%s\n' "$out"
}
"#;

/// Runs the `sh` blocks of `text` as one script in `fresh`'s directory.
fn run_shell(fresh: &Fresh, text: &str, name: &str) -> String {
    let mut script = String::from("set -u\n");
    script.push_str(WRAPPER);
    for block in blocks(text, "sh") {
        for line in block.lines() {
            let line = line.replace("localhost:8080", &fresh.host);
            match line.trim().strip_prefix("# expect:") {
                Some(code) => script.push_str(&format!("__expect={}\n", code.trim())),
                None => {
                    script.push_str(&line);
                    script.push('\n');
                }
            }
        }
    }
    let path = path_with_zonecast();
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(fresh.dir.path())
        .env("PATH", path)
        .env_remove("ZONECAST_DATABASE_URL")
        .env("RUST_LOG", "error")
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name}: an example failed:\n{}\n--- output so far:\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A documented message, `…` made a wildcard, read as JSON.
fn pattern(line: &str) -> Value {
    let normal = line
        .replace("[…]", "\"…\"")
        .replace("{…}", "\"…\"")
        .replace(",…}", "}")
        .replace(",…]", "]");
    serde_json::from_str(&normal).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

/// `got` has every member `want` names, with the same value where it gives one.
fn matches(want: &Value, got: &Value) -> bool {
    match (want, got) {
        (Value::String(w), _) if w == "…" => true,
        (Value::Object(w), Value::Object(g)) => w
            .iter()
            .all(|(k, v)| g.get(k).is_some_and(|gv| matches(v, gv))),
        _ => want == got,
    }
}

async fn replay_session(fresh: &Fresh, key: &str, session: &str) {
    let url = format!("ws://{}/ws/zones/1?access_token={key}", fresh.host);
    let (inner, _) = within("WS connect", tokio_tungstenite::connect_async(url))
        .await
        .expect("WS handshake");
    let mut ws = Ws { inner };
    let lines: Vec<&str> = session.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut i = 0;
    while i < lines.len() {
        if let Some(msg) = lines[i].strip_prefix("> ") {
            ws.send_text(msg).await;
            i += 1;
            continue;
        }
        // A run of server lines: matched as a set, in whatever order they come.
        let mut wanted: Vec<&str> = Vec::new();
        while i < lines.len() {
            match lines[i].strip_prefix("< ") {
                Some(l) => wanted.push(l),
                None => break,
            }
            i += 1;
        }
        assert!(
            !wanted.is_empty(),
            "a session line is neither > nor <: {}",
            lines[i]
        );
        let mut got = Vec::new();
        for _ in 0..wanted.len() {
            got.push(ws.recv().await);
        }
        for w in &wanted {
            let p = pattern(w);
            let at = got
                .iter()
                .position(|g| matches(&p, g))
                .unwrap_or_else(|| panic!("documented {w}\nbut the server sent {got:?}"));
            got.remove(at);
        }
    }
}

#[tokio::test]
async fn the_readme_examples_work_as_printed() {
    let mut fresh = start_fresh().await;
    let readme = doc("README.md");
    run_shell(&fresh, &readme, "README.md");
    let key = std::fs::read_to_string(fresh.dir.path().join("zonecast-admin-key"))
        .expect("the key file the README reads")
        .trim()
        .to_owned();
    let sessions: Vec<String> = blocks(&readme, "text")
        .into_iter()
        .filter(|b| b.lines().any(|l| l.starts_with("> ")))
        .collect();
    assert_eq!(sessions.len(), 1, "the README has one WebSocket session");
    replay_session(&fresh, &key, &sessions[0]).await;
    let _ = fresh.process.start_kill();
}

#[tokio::test]
async fn the_protocol_reference_examples_work_as_printed() {
    let mut fresh = start_fresh().await;
    let out = run_shell(&fresh, &doc("docs/protocol.md"), "docs/protocol.md");
    assert!(
        out.contains("insufficient_stock") && out.contains("idempotency_key_reused"),
        "{out}"
    );
    let _ = fresh.process.start_kill();
}
