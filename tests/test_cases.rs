//! Code that misbehaves, sent through the MCP server to the sandboxed runner on the local
//! stack. After each job no process of it may be left on the machine.

mod common;

use std::time::Instant;

use common::{assert_no_job_processes_left, PrefectProbe, Server};

#[tokio::test]
async fn memory_hog_gets_memory_limit_status() {
    let server = Server::start().await;
    let code = "print(\"before\", flush=True); b = bytearray(600 * 1024 * 1024)";
    let reply = server.run(code, Some(60)).await;

    assert!(reply.is_error);
    assert_eq!(reply.status(), "memory_limit", "{}", reply.text);
    assert_eq!(reply.stdout(), "before\n");
    assert!(reply.exit_code().is_some_and(|code| code != 0), "{}", reply.text);
    assert!(reply.error().contains("memory limit of 256 MiB"), "{}", reply.error());
    let run = PrefectProbe::new().flow_run(reply.flow_run_id().expect("a run")).await;
    assert_eq!(run["run_count"], 1, "the code ran once");
    assert_no_job_processes_left().await;
    server.stop().await;
}

#[tokio::test]
async fn huge_line_is_truncated_with_marker() {
    let server = Server::start().await;
    let reply = server.run("print(\"A\" * 2_000_000)", Some(60)).await;

    assert!(!reply.is_error, "{}", reply.text);
    assert_eq!(reply.results()["truncated"], true);
    assert!(reply.stdout().starts_with(&"A".repeat(100_000)));
    assert!(reply.stdout().ends_with("[k3s-job-runner: output truncated after 100000 characters]\n"));
    assert!(reply.stdout().chars().count() < 100_100, "{} characters", reply.stdout().chars().count());
    assert_no_job_processes_left().await;
    server.stop().await;
}

#[tokio::test]
async fn many_lines_are_truncated_with_marker() {
    let server = Server::start().await;
    let reply = server.run("for i in range(300000): print(i)", Some(60)).await;

    assert!(!reply.is_error, "{}", reply.text);
    assert_eq!(reply.results()["truncated"], true);
    assert!(reply.stdout().starts_with("0\n1\n2\n"));
    assert!(reply.stdout().ends_with("[k3s-job-runner: output truncated after 100000 characters]\n"));
    assert_no_job_processes_left().await;
    server.stop().await;
}

#[tokio::test]
async fn invalid_utf8_becomes_replacement_character() {
    let server = Server::start().await;
    let code = "import sys; sys.stdout.buffer.write(b\"ok \\xff\\xb2 end\\n\"); \
                print(\"h\\u00e9llo \\u2713 \\u65e5\\u672c\"); sys.stderr.buffer.write(b\"\\x80\\n\")";
    let reply = server.run(code, Some(30)).await;

    assert!(!reply.is_error, "{}", reply.text);
    assert_eq!(reply.stdout(), "ok \u{fffd}\u{fffd} end\nh\u{e9}llo \u{2713} \u{65e5}\u{672c}\n");
    assert_eq!(reply.stderr(), "\u{fffd}\n");
    assert_no_job_processes_left().await;
    server.stop().await;
}

#[tokio::test]
async fn busy_loop_times_out_keeping_output() {
    let server = Server::start().await;
    let started = Instant::now();
    let reply = server.run("print('partial')\nwhile True: pass", Some(10)).await;

    assert!(reply.is_error);
    assert_eq!(reply.status(), "timeout", "{}", reply.text);
    assert_eq!(reply.stdout(), "partial\n");
    let run = PrefectProbe::new().flow_run(reply.flow_run_id().expect("a run")).await;
    let state_type = run["state"]["type"].as_str().unwrap_or_default().to_owned();
    assert!(["COMPLETED", "CANCELLED", "FAILED"].contains(&state_type.as_str()), "{state_type}");
    // The code's own 10 s plus start-up; far below the service's 30 s grace after a start.
    assert!(started.elapsed().as_secs() < 40, "{:?}", started.elapsed());
    assert_no_job_processes_left().await;
    server.stop().await;
}

#[tokio::test]
async fn background_child_is_killed_after_exit() {
    let server = Server::start().await;
    let code = "import subprocess; subprocess.Popen([\"sleep\", \"1000\"]); print(\"bye\")";
    let reply = server.run(code, Some(30)).await;

    assert!(!reply.is_error, "{}", reply.text);
    assert_eq!(reply.stdout(), "bye\n");
    assert_eq!(reply.exit_code(), Some(0));
    assert_no_job_processes_left().await;
    server.stop().await;
}

#[tokio::test]
async fn process_tree_is_killed_at_timeout() {
    let server = Server::start().await;
    let code = "import subprocess, time; subprocess.Popen([\"sh\", \"-c\", \"while :; do echo t; sleep 1; done\"]); \
                time.sleep(999)";
    let reply = server.run(code, Some(10)).await;

    assert_eq!(reply.status(), "timeout", "{}", reply.text);
    assert!(reply.stdout().starts_with("t\n"), "{}", reply.stdout());
    assert_no_job_processes_left().await;
    server.stop().await;
}

#[tokio::test]
async fn endless_output_is_capped_at_timeout() {
    let server = Server::start().await;
    let reply = server.run("while True: print(\"x\" * 10000)", Some(20)).await;

    assert_eq!(reply.status(), "timeout", "{}", reply.text);
    assert_eq!(reply.results()["truncated"], true);
    assert!(reply.stdout().chars().count() < 100_100, "{} characters", reply.stdout().chars().count());
    assert_no_job_processes_left().await;
    server.stop().await;
}

#[tokio::test]
async fn environment_is_an_allowlist() {
    let server = Server::start().await;
    let reply = server
        .run("import os; print(sorted(os.environ)); print(open('/proc/1/environ').read())", Some(30))
        .await;

    assert!(!reply.is_error, "{}", reply.text);
    let names = reply.stdout().lines().next().unwrap_or_default().to_owned();
    for forbidden in ["PREFECT", "K3S_JOB_RUNNER", "TOKEN", "DATABASE", "KEY"] {
        assert!(!names.contains(forbidden), "{forbidden} visible: {names}");
    }
    assert!(names.contains("'PATH'"), "{names}");
    assert!(names.contains("'HOME'"), "{names}");
    assert!(!reply.stdout().contains("PREFECT_"), "{}", reply.stdout());
    assert_no_job_processes_left().await;
    server.stop().await;
}

#[tokio::test]
async fn network_is_unreachable() {
    let server = Server::start().await;
    let code = format!(
        "import urllib.request as u\ntry:\n    u.urlopen(\"{}/health\", timeout=3)\n    print('reached')\n\
         except Exception as error:\n    print('blocked', type(error).__name__)",
        common::api_url()
    );
    let reply = server.run(&code, Some(30)).await;

    assert!(!reply.is_error, "{}", reply.text);
    assert!(reply.stdout().starts_with("blocked"), "{}", reply.stdout());
    assert_no_job_processes_left().await;
    server.stop().await;
}

#[tokio::test]
async fn system_files_are_read_only_and_tmp_writable() {
    let server = Server::start().await;
    let code = "try:\n    open(\"/etc/x\", \"w\")\nexcept OSError as error:\n    print(\"denied\", error.strerror)\n\
                import tempfile; p = tempfile.mkstemp()[1]; open(p, \"w\").write(\"ok\"); print(open(p).read())";
    let reply = server.run(code, Some(30)).await;

    assert!(!reply.is_error, "{}", reply.text);
    let mut lines = reply.stdout().lines();
    assert_eq!(lines.next(), Some("denied Read-only file system"), "{}", reply.stdout());
    assert_eq!(lines.next(), Some("ok"));
    assert_eq!(reply.results()["sandbox"], "bubblewrap");
    assert_no_job_processes_left().await;
    server.stop().await;
}
