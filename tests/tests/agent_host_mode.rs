//! The agent in host mode (`--listen unix://…`), driven through the
//! generated ttrpc clients, running real containers from a busybox rootfs.

use std::time::Duration;

use kestrel_protocols::agent::*;
use kestrel_protocols::agent_ttrpc::AgentServiceClient;
use kestrel_protocols::health::{health_check_response::ServingStatus, CheckRequest};
use kestrel_protocols::oci;
use kestrel_protocols::ttrpc::Code;
use kestrel_tests::*;

macro_rules! require {
    ($name:literal) => {
        if !require($name) {
            return;
        }
    };
}

/// An agent in host mode, a client for it and a busybox rootfs.
async fn setup() -> (Agent, AgentServiceClient, std::path::PathBuf) {
    let agent = Agent::start();
    let (client, _) = agent.client().await;
    let rootfs = busybox_rootfs(agent.dir.path());
    (agent, client, rootfs)
}

/// A started container whose init sleeps, to exec into and signal.
async fn start_sleeper(client: &AgentServiceClient, rootfs: &std::path::Path, id: &str) {
    create(client, id, spec(rootfs, &["sleep", "1000"])).await;
    start(client, id).await;
}

async fn create(client: &AgentServiceClient, id: &str, spec: oci::Spec) {
    client
        .create_container(prompt(), &create_request(id, spec))
        .await
        .expect("CreateContainer");
}

async fn exec(
    client: &AgentServiceClient,
    id: &str,
    exec_id: &str,
    args: &[&str],
    terminal: bool,
) -> kestrel_protocols::ttrpc::Result<()> {
    let mut req = ExecProcessRequest::new();
    req.container_id = id.into();
    req.exec_id = exec_id.into();
    let p = req.process.mut_or_insert_default();
    p.Args = args.iter().map(|a| a.to_string()).collect();
    p.Env = vec!["PATH=/bin".into()];
    p.Cwd = "/".into();
    p.Terminal = terminal;
    client.exec_process(prompt(), &req).await.map(drop)
}

async fn signal(
    client: &AgentServiceClient,
    id: &str,
    exec_id: &str,
    sig: i32,
) -> kestrel_protocols::ttrpc::Result<()> {
    let mut req = SignalProcessRequest::new();
    req.container_id = id.into();
    req.exec_id = exec_id.into();
    req.signal = sig as u32;
    client.signal_process(prompt(), &req).await.map(drop)
}

#[tokio::test]
async fn health_check_answers_serving_with_the_agent_version() {
    require!("health_check_answers_serving_with_the_agent_version");
    let agent = Agent::start();
    let (_, health) = agent.client().await;
    let resp = health.check(prompt(), &CheckRequest::new()).await.unwrap();
    assert_eq!(resp.status.enum_value(), Ok(ServingStatus::SERVING));
    let version = health
        .version(prompt(), &CheckRequest::new())
        .await
        .unwrap();
    assert_eq!(version.agent_version, env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn echo_hello_prints_hello_and_exits_zero() {
    require!("echo_hello_prints_hello_and_exits_zero");
    let (_agent, client, rootfs) = setup().await;
    let (out, err, status) = run(&client, "hello", spec(&rootfs, &["echo", "hello"])).await;
    assert_eq!(out, "hello\n");
    assert_eq!(err, "");
    assert_eq!(status, 0);
}

#[tokio::test]
async fn exit_status_is_reported_and_repeated_until_removal() {
    require!("exit_status_is_reported_and_repeated_until_removal");
    let (_agent, client, rootfs) = setup().await;
    create(
        &client,
        "exit7",
        spec(&rootfs, &["sh", "-c", "echo oops >&2; exit 7"]),
    )
    .await;
    start(&client, "exit7").await;
    assert_eq!(wait(&client, "exit7", "").await.unwrap(), 7);
    assert_eq!(
        wait(&client, "exit7", "exit7").await.unwrap(),
        7,
        "second wait"
    );
    assert_eq!(read_all(&client, "exit7", "", true).await, b"oops\n");
    remove(&client, "exit7").await.unwrap();
    let err = wait(&client, "exit7", "").await.unwrap_err();
    assert_eq!(code(&err), Code::NOT_FOUND);
}

#[tokio::test]
async fn container_sees_its_own_hostname_pid_namespace_and_rootfs() {
    require!("container_sees_its_own_hostname_pid_namespace_and_rootfs");
    let (_agent, client, rootfs) = setup().await;
    let (out, _, status) = run(
        &client,
        "isolated",
        spec(
            &rootfs,
            &["sh", "-c", "hostname; echo pid=$$; ls /bin/busybox; pwd"],
        ),
    )
    .await;
    assert_eq!(status, 0);
    assert_eq!(out, "kestrel-test\npid=1\n/bin/busybox\n/\n");
}

#[tokio::test]
async fn exec_runs_inside_the_running_container() {
    require!("exec_runs_inside_the_running_container");
    let (_agent, client, rootfs) = setup().await;
    start_sleeper(&client, &rootfs, "svc").await;
    exec(
        &client,
        "svc",
        "e1",
        &["sh", "-c", "hostname; echo in-pidns=$$; exit 3"],
        false,
    )
    .await
    .unwrap();
    let out = read_all(&client, "svc", "e1", false).await;
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("kestrel-test\nin-pidns="), "{text}");
    let pid: u32 = text.trim().rsplit('=').next().unwrap().parse().unwrap();
    assert!(
        pid < 100,
        "exec'd process should have a small pid in the container's namespace, got {pid}"
    );
    assert_eq!(wait(&client, "svc", "e1").await.unwrap(), 3);

    let dup = exec(&client, "svc", "e1", &["true"], false)
        .await
        .unwrap_err();
    assert_eq!(code(&dup), Code::ALREADY_EXISTS);
    let missing = exec(&client, "svc", "e2", &["no-such-program"], false)
        .await
        .unwrap_err();
    assert_eq!(code(&missing), Code::INVALID_ARGUMENT);
    assert!(format!("{missing:?}").contains("no-such-program"));
    remove(&client, "svc").await.unwrap();
}

#[tokio::test]
async fn stdin_round_trips_through_cat() {
    require!("stdin_round_trips_through_cat");
    let (_agent, client, rootfs) = setup().await;
    create(&client, "cat", spec(&rootfs, &["cat"])).await;
    start(&client, "cat").await;
    let mut w = WriteStreamRequest::new();
    w.container_id = "cat".into();
    w.data = b"ping\n".to_vec();
    assert_eq!(client.write_stdin(prompt(), &w).await.unwrap().len, 5);
    w.data = Vec::new();
    client.write_stdin(prompt(), &w).await.unwrap();
    assert_eq!(read_all(&client, "cat", "", false).await, b"ping\n");
    assert_eq!(wait(&client, "cat", "").await.unwrap(), 0);
    remove(&client, "cat").await.unwrap();
}

#[tokio::test]
async fn sigkill_and_sigterm_give_137_and_143() {
    require!("sigkill_and_sigterm_give_137_and_143");
    let (_agent, client, rootfs) = setup().await;
    start_sleeper(&client, &rootfs, "sig").await;
    exec(&client, "sig", "term", &["sleep", "1000"], false)
        .await
        .unwrap();
    signal(&client, "sig", "term", libc::SIGTERM).await.unwrap();
    assert_eq!(wait(&client, "sig", "term").await.unwrap(), 143);
    let again = signal(&client, "sig", "term", libc::SIGTERM)
        .await
        .unwrap_err();
    assert_eq!(
        code(&again),
        Code::NOT_FOUND,
        "signal to a finished process"
    );

    signal(&client, "sig", "sig", libc::SIGKILL).await.unwrap();
    assert_eq!(wait(&client, "sig", "").await.unwrap(), 137);
    let bad = signal(&client, "sig", "", 0).await.unwrap_err();
    assert_eq!(code(&bad), Code::INVALID_ARGUMENT);
    remove(&client, "sig").await.unwrap();
}

#[tokio::test]
async fn empty_exec_id_signals_every_process() {
    require!("empty_exec_id_signals_every_process");
    let (_agent, client, rootfs) = setup().await;
    start_sleeper(&client, &rootfs, "all").await;
    exec(&client, "all", "x", &["sleep", "1000"], false)
        .await
        .unwrap();
    signal(&client, "all", "", libc::SIGKILL).await.unwrap();
    assert_eq!(wait(&client, "all", "x").await.unwrap(), 137);
    assert_eq!(wait(&client, "all", "").await.unwrap(), 137);
    remove(&client, "all").await.unwrap();
}

#[tokio::test]
async fn pause_freezes_and_resume_thaws() {
    require!("pause_freezes_and_resume_thaws");
    let (_agent, client, rootfs) = setup().await;
    start_sleeper(&client, &rootfs, "pz").await;
    let mut p = PauseContainerRequest::new();
    p.container_id = "pz".into();
    client.pause_container(prompt(), &p).await.unwrap();
    assert!(cgroup_frozen("pz"));
    let twice = client.pause_container(prompt(), &p).await.unwrap_err();
    assert_eq!(code(&twice), Code::FAILED_PRECONDITION);
    let mut r = ResumeContainerRequest::new();
    r.container_id = "pz".into();
    client.resume_container(prompt(), &r).await.unwrap();
    assert!(!cgroup_frozen("pz"));
    exec(&client, "pz", "after", &["true"], false)
        .await
        .unwrap();
    assert_eq!(wait(&client, "pz", "after").await.unwrap(), 0);
    remove(&client, "pz").await.unwrap();
}

#[tokio::test]
async fn stats_report_cpu_memory_and_pids() {
    require!("stats_report_cpu_memory_and_pids");
    let (_agent, client, rootfs) = setup().await;
    let busy = "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo ready; sleep 1000";
    let mut s = spec(&rootfs, &["sh", "-c", busy]);
    s.Linux
        .mut_or_insert_default()
        .Resources
        .mut_or_insert_default()
        .Pids
        .mut_or_insert_default()
        .Limit = 64;
    create(&client, "st", s).await;
    start(&client, "st").await;
    let mut r = ReadStreamRequest::new();
    r.container_id = "st".into();
    r.len = 6;
    assert_eq!(
        client.read_stdout(forever(), &r).await.unwrap().data,
        b"ready\n"
    );
    let mut req = StatsContainerRequest::new();
    req.container_id = "st".into();
    let stats = client.stats_container(prompt(), &req).await.unwrap();
    let cg = stats.cgroup_stats.as_ref().unwrap();
    assert!(
        cg.cpu_stats.cpu_usage.total_usage > 0,
        "cpu {:?}",
        cg.cpu_stats
    );
    assert!(
        cg.memory_stats.usage.usage > 0,
        "memory {:?}",
        cg.memory_stats
    );
    assert!(cg.pids_stats.current >= 1);
    assert_eq!(cg.pids_stats.limit, 64);
    remove(&client, "st").await.unwrap();
}

#[tokio::test]
async fn container_sees_its_own_cgroup_limits() {
    require!("container_sees_its_own_cgroup_limits");
    let (_agent, client, rootfs) = setup().await;
    let show = "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max";
    let mut s = spec(&rootfs, &["sh", "-c", show]);
    s.Linux
        .mut_or_insert_default()
        .Resources
        .mut_or_insert_default()
        .Memory
        .mut_or_insert_default()
        .Limit = 48 << 20;
    let (out, err, status) = run(&client, "cglimit", s).await;
    assert_eq!((out.as_str(), status), ("50331648\n", 0), "stderr: {err}");
}

#[tokio::test]
async fn remove_container_removes_its_cgroup_mounts_and_processes() {
    require!("remove_container_removes_its_cgroup_mounts_and_processes");
    let (agent, client, rootfs) = setup().await;
    start_sleeper(&client, &rootfs, "rm").await;
    exec(&client, "rm", "bg", &["sleep", "1000"], false)
        .await
        .unwrap();
    assert!(cgroup_dirs("rm").iter().all(|d| d.is_dir()));
    remove(&client, "rm").await.unwrap();
    for d in cgroup_dirs("rm") {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    assert_eq!(mounts_under(&rootfs), Vec::<String>::new());
    assert_eq!(
        code(&remove(&client, "rm").await.unwrap_err()),
        Code::NOT_FOUND
    );
    let children = std::fs::read_to_string(format!(
        "/proc/{}/task/{}/children",
        agent.pid(),
        agent.pid()
    ))
    .unwrap_or_default();
    assert_eq!(children.trim(), "", "the agent still has children");
}

#[tokio::test]
async fn terminal_process_gets_a_resizable_pty() {
    require!("terminal_process_gets_a_resizable_pty");
    let (_agent, client, rootfs) = setup().await;
    let mut s = spec(
        &rootfs,
        &[
            "sh",
            "-c",
            "[ -t 0 ] && echo is-a-terminal; read line; stty size",
        ],
    );
    s.Process.mut_or_insert_default().Terminal = true;
    create(&client, "tty", s).await;
    start(&client, "tty").await;
    let mut resize = TtyWinResizeRequest::new();
    resize.container_id = "tty".into();
    resize.row = 40;
    resize.column = 100;
    client.tty_win_resize(prompt(), &resize).await.unwrap();
    let mut w = WriteStreamRequest::new();
    w.container_id = "tty".into();
    w.data = b"go\n".to_vec();
    client.write_stdin(prompt(), &w).await.unwrap();
    let out = String::from_utf8(read_all(&client, "tty", "", false).await).unwrap();
    assert!(out.contains("is-a-terminal\r\n"), "{out:?}");
    assert!(out.contains("40 100"), "{out:?}");
    assert_eq!(wait(&client, "tty", "").await.unwrap(), 0);
    remove(&client, "tty").await.unwrap();
}

#[tokio::test]
async fn terminal_processes_get_ptys_of_the_containers_own_devpts() {
    require!("terminal_processes_get_ptys_of_the_containers_own_devpts");
    let (_agent, client, rootfs) = setup().await;
    let mut s = spec(&rootfs, &["sh", "-c", "tty; stty size; read line"]);
    let p = s.Process.mut_or_insert_default();
    p.Terminal = true;
    let size = p.ConsoleSize.mut_or_insert_default();
    size.Height = 30;
    size.Width = 90;
    create(&client, "own-pty", s).await;
    start(&client, "own-pty").await;

    // The init holds the first pty of the container's fresh devpts, so an
    // exec'd terminal gets the second; both are there to list.
    exec(
        &client,
        "own-pty",
        "t2",
        &["sh", "-c", "tty; ls /dev/pts | cat"],
        true,
    )
    .await
    .unwrap();
    let out = String::from_utf8(read_all(&client, "own-pty", "t2", false).await).unwrap();
    assert_eq!(out, "/dev/pts/1\r\n0\r\n1\r\nptmx\r\n");
    assert_eq!(wait(&client, "own-pty", "t2").await.unwrap(), 0);

    let mut w = WriteStreamRequest::new();
    w.container_id = "own-pty".into();
    w.data = b"\n".to_vec();
    client.write_stdin(prompt(), &w).await.unwrap();
    let out = String::from_utf8(read_all(&client, "own-pty", "", false).await).unwrap();
    assert!(out.starts_with("/dev/pts/0\r\n30 90\r\n"), "{out:?}");
    assert_eq!(wait(&client, "own-pty", "").await.unwrap(), 0);
    remove(&client, "own-pty").await.unwrap();
}

#[tokio::test]
async fn terminal_in_a_container_without_a_devpts_is_an_invalid_argument() {
    require!("terminal_in_a_container_without_a_devpts_is_an_invalid_argument");
    let (_agent, client, rootfs) = setup().await;
    let mut s = spec(&rootfs, &["tty"]);
    s.Mounts.retain(|m| m.destination != "/dev/pts");
    s.Process.mut_or_insert_default().Terminal = true;
    let err = client
        .create_container(prompt(), &create_request("no-devpts", s))
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::INVALID_ARGUMENT, "{err:?}");
    assert!(format!("{err:?}").contains("/dev/ptmx"), "{err:?}");
}

#[tokio::test]
async fn memory_limit_breach_is_reported_by_get_oom_event() {
    require!("memory_limit_breach_is_reported_by_get_oom_event");
    let (_agent, client, rootfs) = setup().await;
    let mut s = spec(
        &rootfs,
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"],
    );
    s.Linux
        .mut_or_insert_default()
        .Resources
        .mut_or_insert_default()
        .Memory
        .mut_or_insert_default()
        .Limit = 32 << 20;
    create(&client, "oom", s).await;
    start(&client, "oom").await;
    let request = GetOOMEventRequest::new();
    let oom = client.get_oom_event(forever(), &request);
    let event = tokio::time::timeout(Duration::from_secs(20), oom)
        .await
        .expect("no OOM event")
        .unwrap();
    assert_eq!(event.container_id, "oom");
    assert_eq!(wait(&client, "oom", "").await.unwrap(), 137);
    remove(&client, "oom").await.unwrap();
}

#[tokio::test]
async fn bad_ids_are_invalid_arguments_and_unknown_ids_not_found() {
    require!("bad_ids_are_invalid_arguments_and_unknown_ids_not_found");
    let (_agent, client, rootfs) = setup().await;
    let long = "x".repeat(129);
    let shared_table = kestrel_protocols::id::VERDICTS
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(id, _)| *id);
    for bad in ["", "../x", "a/b", long.as_str()]
        .into_iter()
        .chain(shared_table)
    {
        let err = client
            .create_container(prompt(), &create_request(bad, spec(&rootfs, &["true"])))
            .await
            .unwrap_err();
        assert_eq!(code(&err), Code::INVALID_ARGUMENT, "{bad:?}");
    }
    assert_eq!(
        code(&wait(&client, "never-created", "").await.unwrap_err()),
        Code::NOT_FOUND
    );
    assert_eq!(
        code(&wait(&client, "a/b", "").await.unwrap_err()),
        Code::INVALID_ARGUMENT
    );

    create(&client, "dup", spec(&rootfs, &["sleep", "1000"])).await;
    let err = client
        .create_container(prompt(), &create_request("dup", spec(&rootfs, &["true"])))
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::ALREADY_EXISTS);
    assert_eq!(
        code(
            &exec(&client, "dup", "../e", &["true"], false)
                .await
                .unwrap_err()
        ),
        Code::INVALID_ARGUMENT
    );
    assert_eq!(
        code(&wait(&client, "dup", "no-such-exec").await.unwrap_err()),
        Code::NOT_FOUND
    );
    remove(&client, "dup").await.unwrap();
}

#[tokio::test]
async fn incomplete_specs_are_rejected_and_leave_nothing_behind() {
    require!("incomplete_specs_are_rejected_and_leave_nothing_behind");
    let (agent, client, rootfs) = setup().await;

    let mut no_root = spec(&rootfs, &["true"]);
    no_root.Root.clear();
    let mut no_process = spec(&rootfs, &["true"]);
    no_process.Process.clear();
    let missing_rootfs = spec(&agent.dir.path().join("nope"), &["true"]);
    let mut no_oci = create_request("c", spec(&rootfs, &["true"]));
    no_oci.OCI.clear();
    for (what, req) in [
        ("no root", create_request("c", no_root)),
        ("no process", create_request("c", no_process)),
        ("missing rootfs", create_request("c", missing_rootfs)),
        ("no spec", no_oci),
    ] {
        let err = client.create_container(prompt(), &req).await.unwrap_err();
        assert_eq!(code(&err), Code::INVALID_ARGUMENT, "{what}");
    }

    // A failure inside the new container (a mount that cannot work) must
    // clean up the process and cgroup that already existed.
    let mut bad_mount = spec(&rootfs, &["true"]);
    let mut m = oci::Mount::new();
    m.destination = "/mnt".into();
    m.type_ = "no-such-filesystem".into();
    m.source = "none".into();
    bad_mount.Mounts.push(m);
    let err = client
        .create_container(prompt(), &create_request("c", bad_mount))
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::INVALID_ARGUMENT);
    assert!(format!("{err:?}").contains("/mnt"), "{err:?}");
    for d in cgroup_dirs("c") {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    assert_eq!(mounts_under(&rootfs), Vec::<String>::new());
    let children = std::fs::read_to_string(format!(
        "/proc/{}/task/{}/children",
        agent.pid(),
        agent.pid()
    ))
    .unwrap_or_default();
    assert_eq!(children.trim(), "", "a process was left behind");
    // The id is free again.
    let (out, _, status) = run(&client, "c", spec(&rootfs, &["echo", "ok"])).await;
    assert_eq!((out.as_str(), status), ("ok\n", 0));
}

#[tokio::test]
async fn copy_file_stays_inside_the_shared_directory() {
    require!("copy_file_stays_inside_the_shared_directory");
    let agent = Agent::start();
    let (client, _) = agent.client().await;
    let mut req = CopyFileRequest::new();
    req.file_mode = libc::S_IFREG | 0o644;
    req.data = b"hi".to_vec();
    req.file_size = 2;
    for bad in [
        "relative/f".to_string(),
        format!("{}/../escape", agent.shared_dir.display()),
        "/etc/kestrel-test".into(),
    ] {
        req.path = bad.clone();
        let err = client.copy_file(prompt(), &req).await.unwrap_err();
        assert_eq!(code(&err), Code::INVALID_ARGUMENT, "{bad}");
    }
    req.path = format!("{}/c1/rootfs/f", agent.shared_dir.display());
    client.copy_file(prompt(), &req).await.unwrap();
    assert_eq!(
        std::fs::read(agent.shared_dir.join("c1/rootfs/f")).unwrap(),
        b"hi"
    );
}

#[tokio::test]
async fn remove_container_deletes_its_copied_files_from_the_shared_directory() {
    require!("remove_container_deletes_its_copied_files_from_the_shared_directory");
    let agent = Agent::start();
    let (client, _) = agent.client().await;
    // Where CopyFile puts a rootfs: <shared>/<id>/rootfs, named relative
    // to the container's directory as the shim names it.
    busybox_rootfs(&agent.shared_dir.join("copied"));
    let neighbour = agent.shared_dir.join("neighbour/rootfs/f");
    std::fs::create_dir_all(neighbour.parent().unwrap()).unwrap();
    std::fs::write(&neighbour, b"stays").unwrap();
    let rootfs = std::path::Path::new("rootfs");
    let (out, _, status) = run(&client, "copied", spec(rootfs, &["echo", "ok"])).await;
    assert_eq!((out.as_str(), status), ("ok\n", 0));
    assert!(
        !agent.shared_dir.join("copied").exists(),
        "the removed container's files are still in the shared directory"
    );
    assert_eq!(std::fs::read(&neighbour).unwrap(), b"stays");
}

#[tokio::test]
async fn unsupported_methods_answer_unimplemented() {
    require!("unsupported_methods_answer_unimplemented");
    let agent = Agent::start();
    let (client, _) = agent.client().await;
    let err = client
        .get_ip_tables(prompt(), &GetIPTablesRequest::new())
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::UNIMPLEMENTED);
    let err = client
        .get_metrics(prompt(), &GetMetricsRequest::new())
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::UNIMPLEMENTED);
    let mut t = SetGuestDateTimeRequest::new();
    t.Sec = 1;
    let err = client.set_guest_date_time(prompt(), &t).await.unwrap_err();
    assert_eq!(
        code(&err),
        Code::FAILED_PRECONDITION,
        "host mode must not set the host clock"
    );
    let details = client
        .get_guest_details(prompt(), &GuestDetailsRequest::new())
        .await
        .unwrap();
    assert_eq!(details.agent_details.version, env!("CARGO_PKG_VERSION"));
    assert!(!details.agent_details.init_daemon);
}

#[tokio::test]
async fn network_rpcs_in_host_mode_answer_failed_precondition() {
    require!("network_rpcs_in_host_mode_answer_failed_precondition");
    let agent = Agent::start();
    let (client, _) = agent.client().await;
    let mut iface = kestrel_protocols::types::Interface::new();
    iface.hwAddr = "02:00:00:00:00:01".into();
    iface.name = "eth0".into();
    let mut update = UpdateInterfaceRequest::new();
    update.interface = Some(iface).into();
    let errors = [
        client.update_interface(prompt(), &update).await.map(drop),
        client
            .update_routes(prompt(), &UpdateRoutesRequest::new())
            .await
            .map(drop),
        client
            .list_interfaces(prompt(), &ListInterfacesRequest::new())
            .await
            .map(drop),
        client
            .list_routes(prompt(), &ListRoutesRequest::new())
            .await
            .map(drop),
        client
            .add_arp_neighbors(prompt(), &AddARPNeighborsRequest::new())
            .await
            .map(drop),
    ];
    for (method, result) in [
        "UpdateInterface",
        "UpdateRoutes",
        "ListInterfaces",
        "ListRoutes",
        "AddARPNeighbors",
    ]
    .into_iter()
    .zip(errors)
    {
        let err = result.expect_err(method);
        assert_eq!(code(&err), Code::FAILED_PRECONDITION, "{method}");
        let message = status_message(&err);
        assert!(
            message.contains("it never changes the host's network"),
            "{method}: {message:?}"
        );
    }
}

/// The `grpc.AgentService` methods the agent serves; every other method
/// Kata declares must answer UNIMPLEMENTED.
const SERVED: &[&str] = &[
    "CreateContainer",
    "StartContainer",
    "RemoveContainer",
    "ExecProcess",
    "SignalProcess",
    "WaitProcess",
    "UpdateContainer",
    "StatsContainer",
    "PauseContainer",
    "ResumeContainer",
    "WriteStdin",
    "ReadStdout",
    "ReadStderr",
    "CloseStdin",
    "TtyWinResize",
    "CreateSandbox",
    "DestroySandbox",
    "GetGuestDetails",
    "SetGuestDateTime",
    "CopyFile",
    "GetOOMEvent",
    "UpdateInterface",
    "UpdateRoutes",
    "ListInterfaces",
    "ListRoutes",
    "AddARPNeighbors",
];

/// Calls `service/method` with an empty body, the way a client generated
/// from some other proto file would.
async fn raw_call(
    client: &kestrel_protocols::ttrpc::r#async::Client,
    service: &str,
    method: &str,
) -> kestrel_protocols::ttrpc::Result<kestrel_protocols::ttrpc::Response> {
    let mut req = kestrel_protocols::ttrpc::Request::new();
    req.service = service.into();
    req.method = method.into();
    req.timeout_nano = Duration::from_secs(10).as_nanos() as i64;
    client.request(req).await
}

fn status_message(err: &kestrel_protocols::ttrpc::Error) -> String {
    match err {
        kestrel_protocols::ttrpc::Error::RpcStatus(s) => s.message.clone(),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

async fn raw_client(agent: &Agent) -> kestrel_protocols::ttrpc::r#async::Client {
    kestrel_protocols::ttrpc::r#async::Client::connect(&format!(
        "unix://{}",
        agent.socket.display()
    ))
    .await
    .expect("connecting to the agent")
}

#[tokio::test]
async fn every_method_the_agent_does_not_serve_answers_unimplemented_with_its_wire_name() {
    require!("every_method_the_agent_does_not_serve_answers_unimplemented_with_its_wire_name");
    let agent = Agent::start();
    let client = raw_client(&agent).await;
    let service = kestrel_protocols::agent::file_descriptor()
        .services()
        .find(|s| s.proto().name() == "AgentService")
        .expect("agent.proto declares AgentService");
    let mut unserved = Vec::new();
    for method in service.methods() {
        let name = method.proto().name().to_string();
        if SERVED.contains(&name.as_str()) {
            continue;
        }
        let err = raw_call(&client, "grpc.AgentService", &name)
            .await
            .expect_err(&name);
        assert_eq!(code(&err), Code::UNIMPLEMENTED, "{name}");
        let message = status_message(&err);
        assert!(
            message.contains(&format!("grpc.AgentService/{name} ")),
            "{name}: {message:?} does not name the wire method"
        );
        unserved.push(name);
    }
    for kata_only in [
        "GetDiagnosticData",
        "MemAgentMemcgSet",
        "MemAgentCompactSet",
        "AddSwapPath",
        "GetIPTables",
    ] {
        assert!(
            unserved.iter().any(|m| m == kata_only),
            "{kata_only} was not tried"
        );
    }
}

#[tokio::test]
async fn an_unknown_service_answers_unimplemented_and_the_connection_goes_on() {
    require!("an_unknown_service_answers_unimplemented_and_the_connection_goes_on");
    let agent = Agent::start();
    let client = raw_client(&agent).await;
    let err = raw_call(&client, "grpc.NoSuchService", "Probe")
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::UNIMPLEMENTED);
    let message = status_message(&err);
    assert!(message.contains("grpc.NoSuchService/Probe"), "{message:?}");
    let err = raw_call(&client, "grpc.AgentService", "NoSuchMethod")
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::UNIMPLEMENTED);
    // The same connection still carries real calls.
    let health = kestrel_protocols::health_ttrpc::HealthClient::new(client);
    let resp = health.check(prompt(), &CheckRequest::new()).await.unwrap();
    assert_eq!(resp.status.enum_value(), Ok(ServingStatus::SERVING));
}

#[tokio::test]
async fn passfd_stdio_ports_are_refused_as_unimplemented() {
    require!("passfd_stdio_ports_are_refused_as_unimplemented");
    let (_agent, client, rootfs) = setup().await;
    let mut req = create_request("passfd", spec(&rootfs, &["true"]));
    req.stdout_port = 1025;
    let err = client.create_container(prompt(), &req).await.unwrap_err();
    assert_eq!(code(&err), Code::UNIMPLEMENTED);
    create(&client, "passfd", spec(&rootfs, &["sleep", "1000"])).await;
    let mut exec = ExecProcessRequest::new();
    exec.container_id = "passfd".into();
    exec.exec_id = "e".into();
    exec.stdin_port = 1026;
    let err = client.exec_process(prompt(), &exec).await.unwrap_err();
    assert_eq!(code(&err), Code::UNIMPLEMENTED);
}

fn sh_hook(script: &str, timeout: i64) -> oci::Hook {
    oci::Hook {
        Path: "/bin/sh".into(),
        Args: vec!["sh".into(), "-c".into(), script.into()],
        Timeout: timeout,
        ..Default::default()
    }
}

/// createContainer runs in the container's mount namespace before
/// pivot_root, from the new root (its path resolves in the agent's
/// namespace: here the host's /bin/sh); startContainer runs inside the
/// container (the rootfs's busybox sh) before the program.
#[tokio::test]
async fn create_container_and_start_container_hooks_run_in_the_container_before_its_program() {
    require!("create_container_and_start_container_hooks_run_in_the_container_before_its_program");
    let (agent, client, rootfs) = setup().await;
    let saved = agent.dir.path().join("create-state.json");
    let mut s = spec(
        &rootfs,
        &["sh", "-c", "cat /etc/hook-note /tmp/start-state.json"],
    );
    s.Process
        .mut_or_insert_default()
        .Env
        .push("NOTE=from-the-process-env".into());
    let hooks = s.Hooks.mut_or_insert_default();
    hooks.CreateContainer = vec![sh_hook(
        &format!(
            "cat > {}; test -d proc/self && echo \"written from $(pwd)\" > etc/hook-note",
            saved.display()
        ),
        0,
    )];
    hooks.StartContainer = vec![sh_hook(
        "cat > /tmp/start-state.json; echo \" $NOTE\" >> /tmp/start-state.json",
        5,
    )];
    let (out, err, status) = run(&client, "guesthooks", s).await;
    assert_eq!(status, 0, "stderr: {err}");
    let (note, rest) = out.split_once('\n').expect("two parts");
    assert_eq!(note, format!("written from {}", rootfs.display()));
    let (start, env) = rest.rsplit_once(' ').expect("state, then env");
    assert_eq!(
        env, "from-the-process-env\n",
        "a hook without env gets the process's"
    );
    let start: serde_json::Value = serde_json::from_str(start).expect(start);
    let create: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&saved).expect("createContainer ran")).unwrap();
    for (state, status) in [(&create, "creating"), (&start, "created")] {
        assert_eq!(state["id"], "guesthooks", "{state}");
        assert_eq!(state["status"], status, "{state}");
        assert_eq!(state["pid"], 1, "the pid as the container sees it: {state}");
        assert_eq!(state["ociVersion"], "1.1.0", "{state}");
        assert!(
            state["bundle"]
                .as_str()
                .is_some_and(|b| b.ends_with("/guesthooks")),
            "{state}"
        );
    }
}

#[tokio::test]
async fn a_failing_start_container_hook_fails_start_and_the_program_never_runs() {
    require!("a_failing_start_container_hook_fails_start_and_the_program_never_runs");
    let (_agent, client, rootfs) = setup().await;
    let mut s = spec(&rootfs, &["sh", "-c", "echo > /tmp/program-ran"]);
    s.Hooks.mut_or_insert_default().StartContainer =
        vec![sh_hook("echo no ldconfig here >&2; exit 3", 0)];
    create(&client, "hookfail", s).await;
    let mut req = StartContainerRequest::new();
    req.container_id = "hookfail".into();
    let err = client.start_container(prompt(), &req).await.unwrap_err();
    assert_eq!(code(&err), Code::FAILED_PRECONDITION, "{err:?}");
    assert!(
        format!("{err:?}").contains(
            "startContainer hook #0 (/bin/sh) failed: exit status 3, stderr: no ldconfig here"
        ),
        "{err:?}"
    );
    assert_ne!(wait(&client, "hookfail", "").await.unwrap(), 0);
    assert!(!rootfs.join("tmp/program-ran").exists(), "the program ran");
    remove(&client, "hookfail").await.unwrap();
}

#[tokio::test]
async fn a_create_container_hook_past_its_timeout_fails_create_and_leaves_nothing() {
    require!("a_create_container_hook_past_its_timeout_fails_create_and_leaves_nothing");
    let (_agent, client, rootfs) = setup().await;
    let mut s = spec(&rootfs, &["true"]);
    s.Hooks.mut_or_insert_default().CreateContainer = vec![sh_hook("sleep 100", 1)];
    let started = std::time::Instant::now();
    let err = client
        .create_container(prompt(), &create_request("hookslow", s))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(code(&err), Code::DEADLINE_EXCEEDED, "{err:?}");
    assert!(
        format!("{err:?}").contains(
            "createContainer hook #0 (/bin/sh) ran past its timeout of 1s and was killed"
        ),
        "{err:?}"
    );
    for d in cgroup_dirs("hookslow") {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    assert_eq!(mounts_under(&rootfs), Vec::<String>::new());
    // Nothing holds the id: the same container without the hook runs.
    let (out, _, status) = run(&client, "hookslow", spec(&rootfs, &["echo", "fine"])).await;
    assert_eq!((out.as_str(), status), ("fine\n", 0));
}

/// The namespace paths a CRI app container carries name the pause
/// container's namespaces on the host; the agent gives the container its
/// pod's (the first container's) instead, and never joins the host path.
#[tokio::test]
async fn host_namespace_paths_become_the_pods_namespaces() {
    require!("host_namespace_paths_become_the_pods_namespaces");
    let (_agent, client, rootfs) = setup().await;
    let show = "hostname; for n in ipc pid uts net; do readlink /proc/self/ns/$n; done";
    let mut pause = spec(&rootfs, &["sleep", "1000"]);
    pause.Hostname = "pod-1".into();
    create(&client, "pause", pause).await;
    start(&client, "pause").await;
    exec(&client, "pause", "look", &["sh", "-c", show], false)
        .await
        .unwrap();
    let pods = String::from_utf8(read_all(&client, "pause", "look", false).await).unwrap();

    let mut app = spec(&rootfs, &["sh", "-c", show]);
    app.Hostname.clear();
    let bogus = "/proc/999999999/ns";
    for ns in app.Linux.mut_or_insert_default().Namespaces.iter_mut() {
        match ns.Type.as_str() {
            "ipc" | "uts" | "pid" => ns.Path = format!("{bogus}/{}", ns.Type),
            _ => {}
        }
    }
    let mut net = oci::LinuxNamespace::new();
    net.Type = "network".into();
    net.Path = "/var/run/netns/cni-not-on-this-host".into();
    app.Linux.mut_or_insert_default().Namespaces.push(net);
    let (apps, err, status) = run(&client, "app", app).await;
    assert_eq!(status, 0, "{apps}{err}");
    assert_eq!(apps, pods, "the app container is in the pod's namespaces");
    assert!(pods.starts_with("pod-1\n"), "{pods}");
    let host_net = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert!(
        apps.trim_end().ends_with(&*host_net.to_string_lossy()),
        "a network path is the agent's (the VM's) network: {apps}"
    );

    let mut alone = spec(&rootfs, &["sh", "-c", show]);
    alone.Hostname = "own".into();
    let (own, _, _) = run(&client, "alone", alone).await;
    assert_ne!(
        own.lines().nth(1),
        pods.lines().nth(1),
        "no path: its own IPC namespace"
    );
    assert!(own.starts_with("own\n"), "{own}");
    remove(&client, "pause").await.unwrap();
}

#[tokio::test]
async fn a_hostname_without_a_private_uts_namespace_is_refused() {
    require!("a_hostname_without_a_private_uts_namespace_is_refused");
    let (_agent, client, rootfs) = setup().await;
    let mut s = spec(&rootfs, &["true"]);
    s.Linux
        .mut_or_insert_default()
        .Namespaces
        .retain(|ns| ns.Type != "uts");
    let err = client
        .create_container(prompt(), &create_request("nouts", s))
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::INVALID_ARGUMENT);
    assert!(
        format!("{err:?}").contains("private UTS namespace"),
        "{err:?}"
    );
}

/// Once the pod's first container has exited, its PID namespace takes no
/// new process: a container asking for the pod's PID namespace is refused
/// as a precondition, naming why, and leaves nothing; the pod's IPC and
/// UTS namespaces, held open, still serve.
#[tokio::test]
async fn the_pods_pid_namespace_after_its_first_container_exited_is_a_failed_precondition() {
    require!("the_pods_pid_namespace_after_its_first_container_exited_is_a_failed_precondition");
    let (_agent, client, rootfs) = setup().await;
    start_sleeper(&client, &rootfs, "first-exited").await;
    signal(&client, "first-exited", "", 9).await.unwrap();
    assert_eq!(wait(&client, "first-exited", "").await.unwrap(), 137);
    let joining = |kinds: &[&str]| {
        let mut s = spec(&rootfs, &["true"]);
        s.Hostname.clear();
        for ns in s.Linux.mut_or_insert_default().Namespaces.iter_mut() {
            if kinds.contains(&ns.Type.as_str()) {
                ns.Path = format!("/proc/1/ns/{}", ns.Type);
            }
        }
        s
    };
    let err = client
        .create_container(prompt(), &create_request("late", joining(&["pid"])))
        .await
        .unwrap_err();
    assert_eq!(code(&err), Code::FAILED_PRECONDITION, "{err:?}");
    assert!(
        format!("{err:?}").contains("first container has exited"),
        "{err:?}"
    );
    assert!(
        cgroup_dirs("late").iter().all(|d| !d.exists()),
        "no cgroup left"
    );
    let (_, _, status) = run(&client, "ipc-uts", joining(&["ipc", "uts"])).await;
    assert_eq!(status, 0);
    remove(&client, "first-exited").await.unwrap();
}
