//! The shim's Task service in process (no containerd), with containers in a
//! process sandbox: the State-during-teardown race of kata-containers issue
//! 12336, event order, codes, and sandbox death.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use containerd_shim_protos::api::*;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::ttrpc::Code;
use containerd_shim_protos::types::task::Status;
use kestrel_host::lifecycle::events::Event;
use kestrel_host::lifecycle::relist::ObservedState;
use kestrel_tests::shim::{bundle, prompt, status, InProcessShim};
use kestrel_tests::{busybox_rootfs, code, require};

const SIGKILL: u32 = 9;

/// The shim in process with a busybox rootfs, or `None` (printed) when the
/// machine cannot run containers.
async fn setup(test: &str) -> Option<(InProcessShim, std::path::PathBuf)> {
    if !require(test) {
        return None;
    }
    let shim = InProcessShim::start().await;
    let rootfs = busybox_rootfs(shim.path());
    Some((shim, rootfs))
}
const CALLERS: usize = 150;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn state_during_teardown_reports_stopped_with_exit_code() {
    let Some((shim, rootfs)) = setup("state_during_teardown_reports_stopped_with_exit_code").await
    else {
        return;
    };
    let ids: Vec<String> = (0..6).map(|i| format!("race-{i}")).collect();
    for id in &ids {
        shim.run(&rootfs, id, &["sleep", "1000"]).await;
    }

    // 150 callers ask State of every container in turn until told to stop.
    let done = Arc::new(AtomicBool::new(false));
    type Seen = (Instant, String, Result<(Status, u32), Code>);
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let mut callers = Vec::new();
    for n in 0..CALLERS {
        let (client, ids, done, seen) = (
            shim.client.clone(),
            ids.clone(),
            Arc::clone(&done),
            Arc::clone(&seen),
        );
        callers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut i = n;
            while !done.load(Ordering::Relaxed) {
                let id = &ids[i % ids.len()];
                i += 1;
                let asked = Instant::now();
                let req = StateRequest {
                    id: id.clone(),
                    ..Default::default()
                };
                let answer = match client.state(prompt(), &req).await {
                    Ok(resp) => Ok((status(&resp), resp.exit_status)),
                    Err(e) => Err(code(&e)),
                };
                mine.push((asked, id.clone(), answer));
            }
            seen.lock().unwrap().extend(mine);
        }));
    }

    tokio::time::sleep(Duration::from_millis(300)).await;
    for id in &ids {
        shim.kill(id, "", SIGKILL).await.expect("Kill");
        // Delete as soon as containerd would: when Wait returns.
        assert_eq!(shim.wait(id, "").await, 137);
        let deleted = shim.delete(id, "").await.expect("Delete");
        assert_eq!(deleted.exit_status, 137);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    done.store(true, Ordering::Relaxed);
    for c in callers {
        c.await.unwrap();
    }

    let exits: HashMap<String, Instant> = shim
        .events
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(at, e)| match e {
            Event::Exit { container_id, .. } => Some((container_id.clone(), *at)),
            _ => None,
        })
        .collect();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert!(
        seen.len() > CALLERS * 6,
        "only {} State calls were made",
        seen.len()
    );
    let mut stopped = 0;
    for (asked, id, answer) in seen.iter() {
        match answer {
            Ok((Status::RUNNING, _)) => {
                let exit = exits[id];
                assert!(
                    *asked < exit,
                    "State of {id} asked after its TaskExit answered RUNNING"
                );
            }
            Ok((Status::STOPPED, 137)) => stopped += 1,
            other => panic!("State of {id} answered {other:?}"),
        }
    }
    assert!(stopped > 0, "no State saw a stopped container");
    for id in &ids {
        let resp = shim.state(id, "").await.expect("State from the tombstone");
        assert_eq!((status(&resp), resp.exit_status), (Status::STOPPED, 137));
    }
    let never = shim.state("never-created", "").await.unwrap_err();
    assert_eq!(code(&never), Code::NOT_FOUND);
    shim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_in_lifecycle_order_with_exec_exits_before_the_init_exit() {
    let Some((shim, rootfs)) =
        setup("events_arrive_in_lifecycle_order_with_exec_exits_before_the_init_exit").await
    else {
        return;
    };
    shim.run(&rootfs, "ordered", &["sleep", "1000"]).await;
    exec(&shim, "ordered", "e1", &["sleep", "1000"])
        .await
        .expect("Exec");
    shim.start_process("ordered", "e1").await;
    shim.kill("ordered", "", SIGKILL).await.expect("Kill");
    assert_eq!(shim.wait("ordered", "").await, 137);
    assert_eq!(shim.wait("ordered", "e1").await, 137);
    shim.delete("ordered", "e1").await.expect("Delete exec");
    shim.delete("ordered", "").await.expect("Delete");
    assert_eq!(
        shim.events_of("ordered"),
        [
            "create",
            "start",
            "exec-added e1",
            "exec-started e1",
            "exit e1 137",
            "exit 137",
            "delete"
        ]
    );
    shim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_runs_to_completion_with_its_output_and_exit_code() {
    let Some((shim, rootfs)) =
        setup("a_container_runs_to_completion_with_its_output_and_exit_code").await
    else {
        return;
    };
    let fifo = shim.path().join("stdout");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(fifo).unwrap())
    };
    let b = bundle(
        shim.path(),
        "done",
        &rootfs,
        &["sh", "-c", "echo hello from kestrel; exit 3"],
    );
    shim.create("done", &b, &fifo.display().to_string()).await;
    let created = shim.state("done", "").await.unwrap();
    assert_eq!(status(&created), Status::CREATED);
    shim.start_process("done", "").await;
    assert_eq!(shim.wait("done", "").await, 3);
    let stopped = shim.state("done", "").await.unwrap();
    assert_eq!(
        (status(&stopped), stopped.exit_status),
        (Status::STOPPED, 3)
    );
    assert!(stopped.exited_at.is_some());
    let first = shim.delete("done", "").await.unwrap();
    // Delete is idempotent: the second answers from the tombstone.
    let second = shim.delete("done", "").await.unwrap();
    assert_eq!((first.exit_status, second.exit_status), (3, 3));
    assert_eq!(first.exited_at, second.exited_at);
    // The FIFO's writer is the shim's: drop the runtime to close it.
    shim.shutdown().await;
    let output = reader.join().unwrap();
    assert_eq!(String::from_utf8_lossy(&output), "hello from kestrel\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_errors_answer_the_right_codes() {
    let Some((shim, rootfs)) = setup("lifecycle_errors_answer_the_right_codes").await else {
        return;
    };
    shim.run(&rootfs, "codes", &["sleep", "1000"]).await;

    let b = bundle(shim.path(), "codes", &rootfs, &["true"]);
    let dup = CreateTaskRequest {
        id: "codes".into(),
        bundle: b.display().to_string(),
        ..Default::default()
    };
    assert_eq!(
        code(&shim.client.create(prompt(), &dup).await.unwrap_err()),
        Code::ALREADY_EXISTS
    );
    let missing = CreateTaskRequest {
        id: "nobundle".into(),
        bundle: "/nonexistent".into(),
        ..Default::default()
    };
    let err = shim.client.create(prompt(), &missing).await.unwrap_err();
    assert_eq!(code(&err), Code::INVALID_ARGUMENT, "{err:?}");
    assert!(
        matches!(shim.state("nobundle", "").await, Err(e) if code(&e) == Code::NOT_FOUND),
        "a failed create leaves nothing"
    );

    exec(&shim, "codes", "e1", &["sleep", "1000"])
        .await
        .unwrap();
    let err = exec(&shim, "codes", "e1", &["true"]).await.unwrap_err();
    assert_eq!(code(&err), Code::ALREADY_EXISTS);
    let running = shim.delete("codes", "").await.unwrap_err();
    assert_eq!(code(&running), Code::FAILED_PRECONDITION);
    let checkpoint = shim
        .client
        .checkpoint(
            prompt(),
            &CheckpointTaskRequest {
                id: "codes".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(code(&checkpoint), Code::UNIMPLEMENTED);
    let pause = PauseRequest {
        id: "codes".into(),
        ..Default::default()
    };
    shim.client.pause(prompt(), &pause).await.expect("Pause");
    assert_eq!(
        status(&shim.state("codes", "").await.unwrap()),
        Status::PAUSED
    );
    let again = shim.client.pause(prompt(), &pause).await.unwrap_err();
    assert_eq!(code(&again), Code::FAILED_PRECONDITION);
    shim.client
        .resume(
            prompt(),
            &ResumeRequest {
                id: "codes".into(),
                ..Default::default()
            },
        )
        .await
        .expect("Resume");

    shim.kill("codes", "", SIGKILL).await.unwrap();
    assert_eq!(shim.wait("codes", "").await, 137);
    let finished = shim.kill("codes", "", SIGKILL).await.unwrap_err();
    assert_eq!(code(&finished), Code::NOT_FOUND);
    let late = exec(&shim, "codes", "e2", &["true"]).await.unwrap_err();
    assert_eq!(code(&late), Code::FAILED_PRECONDITION);
    assert_eq!(
        code(&shim.state("codes", "nope").await.unwrap_err()),
        Code::NOT_FOUND
    );
    shim.delete("codes", "").await.unwrap();
    assert_eq!(
        code(&shim.kill("codes", "", SIGKILL).await.unwrap_err()),
        Code::NOT_FOUND
    );
    shim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_death_stops_every_container_with_status_255() {
    let Some((shim, rootfs)) = setup("agent_death_stops_every_container_with_status_255").await
    else {
        return;
    };
    let pod = serde_json::json!({"io.kubernetes.cri.sandbox-id": "pod"});
    for id in ["pod", "side"] {
        let b = kestrel_tests::shim::bundle_with(
            shim.path(),
            id,
            &rootfs,
            &["sleep", "4242"],
            pod.clone(),
        );
        shim.create(id, &b, "").await;
        shim.start_process(id, "").await;
    }
    let agent = shim.guest_pid("side").await;
    let pod_pids = shim.guest_pid("pod").await;
    assert_eq!(pod_pids, agent, "both containers share the pod's sandbox");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    for id in ["pod", "side"] {
        assert_eq!(shim.wait(id, "").await, 255);
        let state = shim.state(id, "").await.unwrap();
        assert_eq!((status(&state), state.exit_status), (Status::STOPPED, 255));
        assert!(shim.events_of(id).contains(&"exit 255".to_string()));
        shim.delete(id, "")
            .await
            .expect("Delete after the sandbox died");
    }
    assert!(
        !shim.path().join("sandboxes/pod").exists(),
        "the sandbox's state dir is gone"
    );
    // The containers died with their agent, as they would with their VM.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_running("sleep 4242").is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        processes_running("sleep 4242"),
        Vec::<u32>::new(),
        "container processes outlived the agent"
    );
    shim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_the_last_container_stops_its_sandbox() {
    let Some((shim, rootfs)) = setup("deleting_the_last_container_stops_its_sandbox").await else {
        return;
    };
    shim.run(&rootfs, "last", &["sleep", "1000"]).await;
    let agent = shim.guest_pid("last").await;
    assert!(shim.path().join("sandboxes/last/agent.sock").exists());
    shim.kill("last", "", SIGKILL).await.unwrap();
    shim.wait("last", "").await;
    shim.delete("last", "").await.unwrap();
    assert!(!shim.path().join("sandboxes/last").exists());
    assert!(
        !std::path::Path::new(&format!("/proc/{agent}")).exists() || is_zombie(agent),
        "agent {agent} still runs"
    );
    shim.shutdown().await;
}

fn processes_running(cmdline: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(bytes) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&bytes)
            .replace('\0', " ")
            .trim_end()
            == cmdline
            && !is_zombie(pid)
        {
            pids.push(pid);
        }
    }
    pids
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.contains(") Z "))
        .unwrap_or(true)
}

async fn exec(
    shim: &InProcessShim,
    id: &str,
    exec_id: &str,
    args: &[&str],
) -> containerd_shim_protos::ttrpc::Result<()> {
    let process = serde_json::json!({"args": args, "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}});
    let req = ExecProcessRequest {
        id: id.into(),
        exec_id: exec_id.into(),
        spec: Some(Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
            value: serde_json::to_vec(&process).unwrap(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    shim.client.exec(prompt(), &req).await.map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relister_sees_a_death_and_keeps_what_it_knew() {
    let Some((shim, rootfs)) = setup("the_relister_sees_a_death_and_keeps_what_it_knew").await
    else {
        return;
    };
    let pid = shim.run(&rootfs, "watched", &["sleep", "1000"]).await;
    let record = |shim: &InProcessShim| {
        let runtime = std::sync::Arc::clone(&shim.runtime);
        async move { runtime.relist_record("watched", "watched").await }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while record(&shim).await.map(|r| r.state) != Some(ObservedState::Running) {
        assert!(
            Instant::now() < deadline,
            "the relister never saw the container run"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shim.kill("watched", "", SIGKILL).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let dead = loop {
        match record(&shim).await {
            Some(r) if r.state == ObservedState::Exited => break r,
            _ => assert!(
                Instant::now() < deadline,
                "the relister never saw the death"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((dead.pid, dead.exit_status), (Some(pid), Some(137)));
    assert_eq!(shim.runtime.relister_health("watched").await, Some(Ok(())));
    shim.delete("watched", "").await.unwrap();
    shim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_io_forwards_pending_stdin_then_closes_it() {
    let Some((shim, rootfs)) = setup("close_io_forwards_pending_stdin_then_closes_it").await else {
        return;
    };
    let mode = nix::sys::stat::Mode::from_bits_truncate(0o600);
    let (stdin, stdout) = (shim.path().join("stdin"), shim.path().join("stdout"));
    nix::unistd::mkfifo(&stdin, mode).unwrap();
    nix::unistd::mkfifo(&stdout, mode).unwrap();
    let reader = {
        let stdout = stdout.clone();
        std::thread::spawn(move || std::fs::read(stdout).unwrap())
    };
    let b = bundle(shim.path(), "piped", &rootfs, &["cat"]);
    shim.create_with_stdin(
        "piped",
        &b,
        &stdin.display().to_string(),
        &stdout.display().to_string(),
    )
    .await;
    shim.start_process("piped", "").await;
    // Like the CRI: the writer stays open and CloseIO says the input ended.
    let mut writer = std::fs::OpenOptions::new()
        .write(true)
        .open(&stdin)
        .unwrap();
    std::io::Write::write_all(&mut writer, b"kept open\n").unwrap();
    let req = CloseIORequest {
        id: "piped".into(),
        stdin: true,
        ..Default::default()
    };
    shim.client.close_io(prompt(), &req).await.expect("CloseIO");
    assert_eq!(shim.wait("piped", "").await, 0);
    shim.delete("piped", "").await.unwrap();
    drop(writer);
    shim.shutdown().await;
    assert_eq!(
        String::from_utf8_lossy(&reader.join().unwrap()),
        "kept open\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_reaches_the_init_alone_unless_all_is_set() {
    let Some((shim, rootfs)) = setup("kill_reaches_the_init_alone_unless_all_is_set").await else {
        return;
    };
    // The init ignores SIGTERM; its exec does not.
    let script = "trap '' TERM; while :; do sleep 1; done";
    shim.run(&rootfs, "targets", &["sh", "-c", script]).await;
    exec(&shim, "targets", "e1", &["sleep", "1000"])
        .await
        .unwrap();
    shim.start_process("targets", "e1").await;
    shim.kill("targets", "", 15)
        .await
        .expect("Kill of the init");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let exec_state = shim.state("targets", "e1").await.unwrap();
    assert_eq!(
        status(&exec_state),
        Status::RUNNING,
        "SIGTERM for the init reached the exec"
    );
    let all = KillRequest {
        id: "targets".into(),
        signal: 15,
        all: true,
        ..Default::default()
    };
    shim.client.kill(prompt(), &all).await.expect("Kill --all");
    assert_eq!(shim.wait("targets", "e1").await, 143);
    shim.kill("targets", "", SIGKILL).await.unwrap();
    assert_eq!(shim.wait("targets", "").await, 137);
    shim.delete("targets", "").await.unwrap();
    shim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_killed_before_start_can_be_waited_for() {
    let Some((shim, rootfs)) = setup("a_container_killed_before_start_can_be_waited_for").await
    else {
        return;
    };
    let b = bundle(shim.path(), "unstarted", &rootfs, &["sleep", "1000"]);
    shim.create("unstarted", &b, "").await;
    shim.kill("unstarted", "", SIGKILL).await.expect("Kill");
    let status_code = tokio::time::timeout(Duration::from_secs(10), shim.wait("unstarted", ""))
        .await
        .expect("Wait returns for a container killed before Start");
    assert_eq!(status_code, 137);
    let state = shim.state("unstarted", "").await.unwrap();
    assert_eq!((status(&state), state.exit_status), (Status::STOPPED, 137));
    shim.delete("unstarted", "").await.unwrap();
    assert_eq!(
        shim.events_of("unstarted"),
        ["create", "exit 137", "delete"]
    );
    shim.shutdown().await;
}
