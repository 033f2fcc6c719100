//! Kubernetes' view of Kestrel: containerd's CRI plugin (Debian's 1.6, in a
//! network namespace the test made) drives pods through `kestrel-cri`'s
//! client, as kubelet would, on the runtime handlers `kestrel` (QEMU
//! sandboxes), `kestrel-process` (the agent on the host) and `runc` (the
//! reference every scenario must also pass on).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use kestrel_cri::api::{ContainerState, NamespaceMode, PodSandboxConfig};
use kestrel_cri::{config, Code};
use kestrel_tests::containerd::{closed_client_got_a_reply, text, TaskLsLoad};
use kestrel_tests::cri::{
    ready, CriContainerd, BUSYBOX_IMAGE, KESTREL_BUILTIN, KESTREL_PROCESS, KESTREL_QEMU, NAMESPACE,
    RUNC,
};

/// The longest a container may take to run: a QEMU sandbox boots under TCG.
const START: Duration = Duration::from_secs(120);

fn sleeper(name: &str, seconds: &str) -> kestrel_cri::api::ContainerConfig {
    config::container(name, BUSYBOX_IMAGE, &["sleep", seconds])
}

/// A pod with one running container; returns (pod id, its config, container id).
fn pod_with_sleeper(
    c: &CriContainerd,
    name: &str,
    handler: &str,
) -> (String, PodSandboxConfig, String) {
    let pod = c.pod_config(name);
    let pod_id = c.run_pod(&pod, handler);
    let id = c.run_container(&pod_id, &pod, sleeper("sleeper", "300"));
    c.wait_for_state(&id, ContainerState::ContainerRunning, START);
    (pod_id, pod, id)
}

// ---------------------------------------------------------------------------
// kata-containers issue 12336, through CRI.

/// Lines of containerd's log that a runc run of the seed scenario has too,
/// so they say nothing about the runtime: containerd 1.6 reports
/// RemovePodSandbox NOT_FOUND for containers `ctr` deleted behind CRI's
/// back, broken pipes of clients that went away, and (see
/// [`closed_client_got_a_reply`]) replies to closed ttrpc clients.
fn also_seen_with_runc(line: &str) -> bool {
    let remove_pod_not_found = line.contains("RemovePodSandbox")
        && (line.contains("not found") || line.contains("NotFound"));
    remove_pod_not_found || line.contains("broken pipe") || closed_client_got_a_reply(line)
}

/// xorshift: a different kill order per run, reproducible from the seed
/// the test prints.
fn shuffle<T>(items: &mut [T], seed: &mut u64) {
    for i in (1..items.len()).rev() {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        items.swap(i, (*seed % (i as u64 + 1)) as usize);
    }
}

/// SIGKILL, task delete (until containerd recorded the exit: CRI's own
/// exit handler may delete the task first), container delete; what ctr
/// printed on stderr.
fn kill_and_delete(c: &CriContainerd, id: &str) -> String {
    let mut printed = String::new();
    let kill = c.ctr(&["task", "kill", "-s", "SIGKILL", id]);
    printed.push_str(&text(&kill.stderr));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let delete = c.ctr(&["task", "delete", id]);
        let stderr = text(&delete.stderr);
        printed.push_str(&stderr);
        if delete.status.success() || stderr.contains("not found") {
            break;
        }
        assert!(Instant::now() < deadline, "ctr task delete {id}: {stderr}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let delete = c.ctr(&["container", "delete", id]);
    printed.push_str(&text(&delete.stderr));
    assert!(
        delete.status.success(),
        "ctr container delete {id}: {}",
        text(&delete.stderr)
    );
    printed
}

fn stderr_of_loops(dir: &Path) -> String {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect()
}

/// 3 pods × 2 containers, all running; 150 `ctr task ls` loops; every
/// container SIGKILLed and deleted with `ctr` in a random order, some while
/// other kills are in flight. No ctr may say "failed to find container" or
/// "get state for", containerd may log no error a runc run does not, CRI
/// must report each container EXITED with 137, and once the pods are
/// stopped and removed nothing may be left; `repetitions` times over.
fn seed_12336_scenario(test: &str, handler: &str, repetitions: usize) {
    let _alone = kestrel_tests::one_load_scenario_at_a_time();
    let Some(image) = ready(test, handler) else {
        return;
    };
    let mut c = CriContainerd::start(image.as_ref());
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("{test}: shuffle seed {seed}");
    for rep in 0..repetitions {
        let mut pods = Vec::new();
        let mut ids = Vec::new();
        for p in 0..3 {
            let pod = c.pod_config(&format!("seed-{rep}-{p}"));
            let pod_id = c.run_pod(&pod, handler);
            for k in 0..2 {
                ids.push(c.run_container(&pod_id, &pod, sleeper(&format!("sleep{k}"), "300")));
            }
            pods.push(pod_id);
        }
        for id in &ids {
            c.wait_for_state(id, ContainerState::ContainerRunning, START);
        }
        let errors_before = c.log_errors().len();
        let loops_dir = c.path().join(format!("task-ls-{rep}"));
        std::fs::create_dir_all(&loops_dir).unwrap();
        let load = TaskLsLoad::start(&c.address, NAMESPACE, 150, Some(&loops_dir));
        std::thread::sleep(Duration::from_secs(2));

        let mut order = ids.clone();
        shuffle(&mut order, &mut seed);
        let delays: Vec<u64> = (0..order.len())
            .map(|i| (seed >> (i * 5)) % 7 * 40)
            .collect();
        let printed: Vec<String> = std::thread::scope(|s| {
            let threads: Vec<_> = order
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    let c = &c;
                    // Staggered starts: some kills land while others'
                    // deletes run, some back to back.
                    let delay = Duration::from_millis(i as u64 * 60 + delays[i]);
                    s.spawn(move || {
                        std::thread::sleep(delay);
                        kill_and_delete(c, id)
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        std::thread::sleep(Duration::from_secs(1));
        drop(load);

        let ctr_output = format!("{}{}", printed.concat(), stderr_of_loops(&loops_dir));
        for needle in ["failed to find container", "get state for"] {
            assert!(
                !ctr_output.contains(needle),
                "rep {rep}: ctr printed {needle:?}:\n{ctr_output}"
            );
            assert!(
                !c.log_text().contains(needle),
                "rep {rep}: containerd logged {needle:?}"
            );
        }
        for id in &ids {
            let status = c.wait_for_state(id, ContainerState::ContainerExited, START);
            assert_eq!(status.exit_code, 137, "rep {rep}: {id}: {status:?}");
        }
        for pod_id in &pods {
            // containerd 1.6 (with runc too) cannot remove a pod one of
            // whose containers `ctr` deleted: RemovePodSandbox answers
            // NOT_FOUND naming that container. Everything that runs is
            // gone all the same; the restart below lets CRI forget them.
            if let Err(e) = c.stop_and_remove_pod(pod_id) {
                assert_eq!(e.code(), Some(Code::NotFound), "rep {rep}: {e}");
                assert!(
                    ids.iter().any(|id| e.to_string().contains(id.as_str())),
                    "rep {rep}: {e}"
                );
            }
        }
        c.assert_nothing_running();
        let errors: Vec<String> = c.log_errors()[errors_before..]
            .iter()
            .filter(|l| !also_seen_with_runc(l))
            .cloned()
            .collect();
        assert_eq!(
            errors,
            Vec::<String>::new(),
            "rep {rep}: errors in containerd's log"
        );
        let error_lines = c.log_errors().len() - errors_before;
        eprintln!(
            "{test}: rep {rep}: {} containers EXITED 137, 0 \"failed to find container\", 0 \"get state for\", \
             {error_lines} containerd error lines (all also seen with runc), nothing left",
            ids.len()
        );
    }
    c.restart();
    c.finish();
}

#[test]
fn seed_12336_scenario_through_cri_on_runc() {
    seed_12336_scenario("seed_12336_scenario_through_cri_on_runc", RUNC, 5);
}

#[test]
fn seed_12336_scenario_through_cri_on_kestrel_process() {
    seed_12336_scenario(
        "seed_12336_scenario_through_cri_on_kestrel_process",
        KESTREL_PROCESS,
        5,
    );
}

#[test]
fn seed_12336_scenario_through_cri_on_kestrel_qemu() {
    seed_12336_scenario(
        "seed_12336_scenario_through_cri_on_kestrel_qemu",
        KESTREL_QEMU,
        5,
    );
}

/// kestrel-vmm pods, in the nested-KVM harness's L1 here: one repetition,
/// as L1 shares one emulated CPU between six guests, containerd and the
/// 150 loops (a repetition takes minutes there); QEMU's run above repeats
/// the same scenario five times.
#[test]
fn seed_12336_scenario_through_cri_on_kestrel_builtin() {
    seed_12336_scenario(
        "seed_12336_scenario_through_cri_on_kestrel_builtin",
        KESTREL_BUILTIN,
        1,
    );
}

// ---------------------------------------------------------------------------
// Pod semantics.

fn ns(c: &CriContainerd, id: &str, kind: &str) -> String {
    c.exec_stdout(id, &["readlink", &format!("/proc/self/ns/{kind}")])
}

/// Two containers of a pod share its hostname, IPC and network namespaces
/// (one reaches the other's loopback listener) and have mount and PID
/// namespaces of their own; with the pod's PID namespace (NamespaceMode
/// POD) each sees the other's processes.
fn containers_of_a_pod_share_uts_ipc_and_network_but_not_mounts(test: &str, handler: &str) {
    let Some(image) = ready(test, handler) else {
        return;
    };
    let c = CriContainerd::start(image.as_ref());
    let pod = c.pod_config("semantics");
    let pod_id = c.run_pod(&pod, handler);
    let server = c.run_container(
        &pod_id,
        &pod,
        config::container(
            "server",
            BUSYBOX_IMAGE,
            &["nc", "-ll", "-p", "8080", "-e", "echo", "pong"],
        ),
    );
    let client = c.run_container(&pod_id, &pod, sleeper("client", "301"));
    for id in [&server, &client] {
        c.wait_for_state(id, ContainerState::ContainerRunning, START);
    }
    let hostname = c.exec_stdout(&server, &["hostname"]);
    assert_eq!(hostname.trim(), pod.hostname, "the pod's hostname");
    assert_eq!(c.exec_stdout(&client, &["hostname"]), hostname);
    for kind in ["uts", "ipc", "net"] {
        assert_eq!(
            ns(&c, &server, kind),
            ns(&c, &client, kind),
            "{kind} namespace"
        );
    }
    if handler == KESTREL_PROCESS {
        // (A guest's root namespace may have the host's inode number.)
        let host = std::fs::read_link("/proc/self/ns/net").unwrap();
        assert_ne!(
            ns(&c, &server, "net").trim(),
            host.to_string_lossy(),
            "the process backend's pod is in the pod's network, not the host's"
        );
    }
    for kind in ["mnt", "pid"] {
        assert_ne!(
            ns(&c, &server, kind),
            ns(&c, &client, kind),
            "{kind} namespace"
        );
    }
    let reply = c.exec(&client, &["sh", "-c", "nc -w 10 127.0.0.1 8080 </dev/null"]);
    let links = c.exec(&client, &["ip", "addr"]);
    assert_eq!(
        (text(&reply.stdout).as_str(), reply.exit_code),
        ("pong\n", 0),
        "the server's loopback listener: {}\nthe pod's interfaces:\n{}",
        text(&reply.stderr),
        text(&links.stdout)
    );
    c.exec_stdout(&server, &["touch", "/tmp/only-in-server"]);
    let seen = c.exec(&client, &["ls", "/tmp/only-in-server"]);
    assert_ne!(seen.exit_code, 0, "the client sees the server's /tmp");
    let ps = c.exec_stdout(&server, &["ps", "-o", "args"]);
    assert!(
        !ps.contains("sleep 301"),
        "per-container PID namespace:\n{ps}"
    );

    let shared = config::Namespaces {
        pid: NamespaceMode::Pod,
        ..Default::default()
    };
    let mut pod2 = c.pod_config("shared-pid");
    config::pod_namespaces(&mut pod2, shared);
    let pod2_id = c.run_pod(&pod2, handler);
    let mut ids = Vec::new();
    for (name, seconds) in [("first", "302"), ("second", "303")] {
        let mut container = sleeper(name, seconds);
        config::container_namespaces(&mut container, shared);
        ids.push(c.run_container(&pod2_id, &pod2, container));
    }
    for id in &ids {
        c.wait_for_state(id, ContainerState::ContainerRunning, START);
    }
    assert_eq!(
        ns(&c, &ids[0], "pid"),
        ns(&c, &ids[1], "pid"),
        "the pod's PID namespace"
    );
    let ps = c.exec_stdout(&ids[1], &["ps", "-o", "args"]);
    assert!(ps.contains("sleep 302"), "the pod's PID namespace:\n{ps}");
    c.finish();
}

#[test]
fn containers_of_a_pod_share_uts_ipc_and_network_but_not_mounts_on_runc() {
    containers_of_a_pod_share_uts_ipc_and_network_but_not_mounts(
        "containers_of_a_pod_share_uts_ipc_and_network_but_not_mounts_on_runc",
        RUNC,
    );
}

#[test]
fn containers_of_a_pod_share_uts_ipc_and_network_but_not_mounts_on_kestrel_qemu() {
    containers_of_a_pod_share_uts_ipc_and_network_but_not_mounts(
        "containers_of_a_pod_share_uts_ipc_and_network_but_not_mounts_on_kestrel_qemu",
        KESTREL_QEMU,
    );
}

/// On the process backend the agent runs in the pod's network namespace:
/// the containers share it, and the host's network is not theirs.
#[test]
fn containers_of_a_pod_share_uts_ipc_and_network_but_not_mounts_on_kestrel_process() {
    containers_of_a_pod_share_uts_ipc_and_network_but_not_mounts(
        "containers_of_a_pod_share_uts_ipc_and_network_but_not_mounts_on_kestrel_process",
        KESTREL_PROCESS,
    );
}

// ---------------------------------------------------------------------------
// ExecSync and container logs.

/// ExecSync brings back stdout, stderr and the exit code; the container's
/// stdout lines land in its log file in CRI's format
/// (`<RFC 3339 time> stdout F <line>`).
fn exec_sync_returns_output_and_exit_code_and_logs_are_in_cri_format(test: &str, handler: &str) {
    let Some(image) = ready(test, handler) else {
        return;
    };
    let c = CriContainerd::start(image.as_ref());
    let pod = c.pod_config("logs");
    let pod_id = c.run_pod(&pod, handler);
    let mut talker = config::container(
        "talker",
        BUSYBOX_IMAGE,
        &[
            "sh",
            "-c",
            "echo first line; echo second line; exec sleep 300",
        ],
    );
    talker.log_path = "talker/0.log".into();
    let id = c.run_container(&pod_id, &pod, talker);
    c.wait_for_state(&id, ContainerState::ContainerRunning, START);

    let out = c.exec(&id, &["sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(
        (
            text(&out.stdout).as_str(),
            text(&out.stderr).as_str(),
            out.exit_code
        ),
        ("out\n", "err\n", 7)
    );

    let log = Path::new(&pod.log_directory).join("talker/0.log");
    assert_eq!(c.container_status(&id).log_path, log.display().to_string());
    let deadline = Instant::now() + Duration::from_secs(30);
    let lines = loop {
        let content = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<String> = content.lines().map(str::to_string).collect();
        if lines.len() >= 2 {
            break lines;
        }
        assert!(Instant::now() < deadline, "{}: {content:?}", log.display());
        std::thread::sleep(Duration::from_millis(50));
    };
    for (line, expected) in lines.iter().zip(["first line", "second line"]) {
        let mut fields = line.splitn(4, ' ');
        let time = fields.next().unwrap_or_default();
        assert!(
            time.len() > 20 && time.as_bytes()[4] == b'-' && time.contains('T'),
            "not an RFC 3339 time: {line:?}"
        );
        assert_eq!(
            fields.collect::<Vec<_>>(),
            vec!["stdout", "F", expected],
            "{line:?}"
        );
    }
    c.finish();
}

#[test]
fn exec_sync_returns_output_and_exit_code_and_logs_are_in_cri_format_on_runc() {
    exec_sync_returns_output_and_exit_code_and_logs_are_in_cri_format(
        "exec_sync_returns_output_and_exit_code_and_logs_are_in_cri_format_on_runc",
        RUNC,
    );
}

#[test]
fn exec_sync_returns_output_and_exit_code_and_logs_are_in_cri_format_on_kestrel_process() {
    exec_sync_returns_output_and_exit_code_and_logs_are_in_cri_format(
        "exec_sync_returns_output_and_exit_code_and_logs_are_in_cri_format_on_kestrel_process",
        KESTREL_PROCESS,
    );
}

#[test]
fn exec_sync_returns_output_and_exit_code_and_logs_are_in_cri_format_on_kestrel_qemu() {
    exec_sync_returns_output_and_exit_code_and_logs_are_in_cri_format(
        "exec_sync_returns_output_and_exit_code_and_logs_are_in_cri_format_on_kestrel_qemu",
        KESTREL_QEMU,
    );
}

// ---------------------------------------------------------------------------
// VM sizing.

/// containerd 1.6 turns PodSandboxConfig.linux.resources into the
/// sandbox-sizing annotations on the pod's sandbox container: the fact
/// the Kestrel shim sizes its VM from, checked where nothing else is in
/// the way (runc's bundle).
#[test]
fn pod_resources_reach_the_sandbox_container_as_sizing_annotations() {
    let test = "pod_resources_reach_the_sandbox_container_as_sizing_annotations";
    if ready(test, RUNC).is_none() {
        return;
    }
    let c = CriContainerd::start(None);
    let mut pod = c.pod_config("sized");
    config::pod_resources(&mut pod, 2.0, 512 << 20);
    let pod_id = c.run_pod(&pod, RUNC);
    let bundle = c
        .path()
        .join("state/io.containerd.runtime.v2.task")
        .join(NAMESPACE)
        .join(&pod_id)
        .join("config.json");
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&bundle).expect("the sandbox's bundle")).unwrap();
    let annotations = &spec["annotations"];
    for (key, value) in [
        ("io.kubernetes.cri.sandbox-cpu-quota", "200000"),
        ("io.kubernetes.cri.sandbox-cpu-period", "100000"),
        ("io.kubernetes.cri.sandbox-memory", "536870912"),
        ("io.kubernetes.cri.container-type", "sandbox"),
    ] {
        assert_eq!(annotations[key], value, "{key}: {annotations}");
    }
    c.finish();
}

/// A pod asking for 2 CPUs and 512 MiB gets a VM with at least that much:
/// the guest's /proc/cpuinfo and /proc/meminfo show it.
#[test]
fn a_pod_asking_2_cpus_and_512_mib_gets_them_in_its_vm() {
    let test = "a_pod_asking_2_cpus_and_512_mib_gets_them_in_its_vm";
    let Some(image) = ready(test, KESTREL_QEMU) else {
        return;
    };
    let c = CriContainerd::start(image.as_ref());
    let mut pod = c.pod_config("sized");
    config::pod_resources(&mut pod, 2.0, 512 << 20);
    let pod_id = c.run_pod(&pod, KESTREL_QEMU);
    let id = c.run_container(&pod_id, &pod, sleeper("sleeper", "300"));
    c.wait_for_state(&id, ContainerState::ContainerRunning, START);
    let cpus: u32 = c
        .exec_stdout(&id, &["grep", "-c", "^processor", "/proc/cpuinfo"])
        .trim()
        .parse()
        .unwrap();
    // On top of the guest's own share ([vm] vcpus = 1, memory_mib = 256
    // here), as Kata's static sizing does.
    assert_eq!(cpus, 3, "CPUs in the guest");
    let meminfo = c.exec_stdout(&id, &["grep", "MemTotal", "/proc/meminfo"]);
    let kib: u64 = meminfo
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{meminfo:?}"));
    // The kernel keeps some of the VM's 768 MiB for itself.
    assert!(
        (700 * 1024..=768 * 1024).contains(&kib),
        "MemTotal {kib} kB in the guest"
    );
    c.finish();
}

// ---------------------------------------------------------------------------
// Bad input.

/// No processes, sandbox state or pods beyond what the test made.
fn assert_no_pod_and_nothing_running(c: &CriContainerd) {
    let pods = c
        .block_on(c.client().list_pod_sandbox(None))
        .expect("ListPodSandbox");
    assert_eq!(pods, vec![], "a pod was left half-created");
    c.assert_nothing_left();
}

/// An unknown runtime handler and a pod asking more vCPUs than a VM can
/// have are refused with an error naming the problem, and leave nothing.
fn bad_pods_are_refused_naming_the_problem_and_leave_nothing(test: &str, handler: &str) {
    let Some(image) = ready(test, handler) else {
        return;
    };
    let c = CriContainerd::start(image.as_ref());
    let pod = c.pod_config("nowhere");
    let err = c
        .block_on(c.client().run_pod_sandbox(pod, "no-such-handler"))
        .expect_err("RunPodSandbox with an unknown handler");
    assert!(err.to_string().contains("no-such-handler"), "{err}");
    assert_no_pod_and_nothing_running(&c);

    if handler != RUNC {
        let mut pod = c.pod_config("huge");
        config::pod_resources(&mut pod, 64.0, 512 << 20);
        let err = c
            .block_on(c.client().run_pod_sandbox(pod, handler))
            .expect_err("RunPodSandbox asking 64 CPUs");
        let message = err.to_string();
        assert!(
            message.contains("64") && message.to_lowercase().contains("cpu"),
            "the error does not name the CPU count: {message}"
        );
        assert_no_pod_and_nothing_running(&c);
    }
    c.finish();
}

#[test]
fn bad_pods_are_refused_naming_the_problem_and_leave_nothing_on_runc() {
    bad_pods_are_refused_naming_the_problem_and_leave_nothing(
        "bad_pods_are_refused_naming_the_problem_and_leave_nothing_on_runc",
        RUNC,
    );
}

#[test]
fn bad_pods_are_refused_naming_the_problem_and_leave_nothing_on_kestrel_qemu() {
    bad_pods_are_refused_naming_the_problem_and_leave_nothing(
        "bad_pods_are_refused_naming_the_problem_and_leave_nothing_on_kestrel_qemu",
        KESTREL_QEMU,
    );
}

/// A container from an image that is not there, or whose command does not
/// exist, fails with an error naming the image or the command; nothing of
/// it is left and the pod goes on working.
fn bad_containers_are_refused_naming_the_problem_and_the_pod_survives(test: &str, handler: &str) {
    let Some(image) = ready(test, handler) else {
        return;
    };
    let c = CriContainerd::start(image.as_ref());
    let (pod_id, pod, sleeper_id) = pod_with_sleeper(&c, "survivor", handler);

    let missing = "docker.io/kestrel-test/not-there:1";
    let err = c
        .block_on(c.client().create_container(
            &pod_id,
            config::container("ghost", missing, &["true"]),
            pod.clone(),
        ))
        .expect_err("CreateContainer from a missing image");
    assert!(err.to_string().contains(missing), "{err}");

    let command = "/no/such/command";
    let id = c
        .block_on(c.client().create_container(
            &pod_id,
            config::container("nocommand", BUSYBOX_IMAGE, &[command]),
            pod.clone(),
        ))
        .expect("CreateContainer (the command is only looked for at start)");
    let err = c
        .block_on(c.client().start_container(&id))
        .expect_err("StartContainer of a missing command");
    assert!(err.to_string().contains(command), "{err}");
    let status = c.container_status(&id);
    assert_ne!(
        status.state,
        ContainerState::ContainerRunning as i32,
        "{status:?}"
    );
    c.block_on(c.client().remove_container(&id))
        .unwrap_or_else(|e| panic!("RemoveContainer: {e}"));

    let containers = c
        .block_on(c.client().list_containers(None))
        .expect("ListContainers");
    assert_eq!(
        containers.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        vec![sleeper_id.as_str()],
        "only the pod's first container is left"
    );
    assert_eq!(c.exec_stdout(&sleeper_id, &["echo", "alive"]), "alive\n");
    let late = c.run_container(&pod_id, &pod, sleeper("late", "300"));
    c.wait_for_state(&late, ContainerState::ContainerRunning, START);
    c.finish();
}

#[test]
fn bad_containers_are_refused_naming_the_problem_and_the_pod_survives_on_runc() {
    bad_containers_are_refused_naming_the_problem_and_the_pod_survives(
        "bad_containers_are_refused_naming_the_problem_and_the_pod_survives_on_runc",
        RUNC,
    );
}

#[test]
fn bad_containers_are_refused_naming_the_problem_and_the_pod_survives_on_kestrel_qemu() {
    bad_containers_are_refused_naming_the_problem_and_the_pod_survives(
        "bad_containers_are_refused_naming_the_problem_and_the_pod_survives_on_kestrel_qemu",
        KESTREL_QEMU,
    );
}

/// `kestrel-cri`, the command, against the same containerd: runp, create,
/// start, exec (its exit status), ps/pods, stopp, rmp; and a CRI error
/// printed with its gRPC code.
#[test]
fn kestrel_cri_command_runs_a_pod_end_to_end_on_kestrel_process() {
    let test = "kestrel_cri_command_runs_a_pod_end_to_end_on_kestrel_process";
    if ready(test, KESTREL_PROCESS).is_none() {
        return;
    }
    let c = CriContainerd::start(None);
    let endpoint = format!("unix://{}", c.address.display());
    let cli = |args: &[&str]| {
        Command::new(kestrel_tests::binary("kestrel-cri"))
            .arg("--endpoint")
            .arg(&endpoint)
            .args(args)
            .output()
            .expect("running kestrel-cri")
    };
    let ok = |args: &[&str]| {
        let out = cli(args);
        assert!(
            out.status.success(),
            "kestrel-cri {args:?}: {}",
            text(&out.stderr)
        );
        text(&out.stdout).trim().to_string()
    };
    let pod = ok(&["runp", "--name", "cli", "--runtime", KESTREL_PROCESS]);
    let id = ok(&[
        "create",
        &pod,
        "--name",
        "app",
        "--image",
        BUSYBOX_IMAGE,
        "--",
        "sleep",
        "300",
    ]);
    ok(&["start", &id]);
    let deadline = Instant::now() + START;
    while !ok(&["inspect", &id]).contains("RUNNING") {
        assert!(Instant::now() < deadline, "{}", ok(&["inspect", &id]));
        std::thread::sleep(Duration::from_millis(100));
    }
    let exec = cli(&["exec", &id, "--", "sh", "-c", "echo hi; exit 3"]);
    assert_eq!(
        (text(&exec.stdout).as_str(), exec.status.code()),
        ("hi\n", Some(3))
    );
    let listed: serde_json::Value = serde_json::from_str(&ok(&["ps", "--json"])).unwrap();
    assert_eq!(listed[0]["id"], id.as_str(), "{listed}");
    assert!(ok(&["pods"]).contains("default/cli"));
    // RemovePodSandbox of an unknown pod succeeds (CRI makes it
    // idempotent); its status does not.
    let missing = cli(&["inspectp", "no-such-pod"]);
    assert!(!missing.status.success());
    assert!(
        text(&missing.stderr).contains("NOT_FOUND"),
        "{}",
        text(&missing.stderr)
    );
    ok(&["stopp", &pod]);
    ok(&["rmp", &pod]);
    c.finish();
}

/// A pod's shim killed with SIGKILL: containerd runs the shim's `delete`
/// action, which must find the sandbox where the handler's ConfigPath put
/// it (not where the default configuration would) and stop it; the pod's
/// container ends, and nothing is left once the pod is removed.
#[test]
fn a_killed_shim_is_cleaned_up_under_the_handlers_config_path() {
    let test = "a_killed_shim_is_cleaned_up_under_the_handlers_config_path";
    let Some(image) = ready(test, KESTREL_PROCESS) else {
        return;
    };
    let c = CriContainerd::start(image.as_ref());
    let (pod_id, _, id) = pod_with_sleeper(&c, "orphan", KESTREL_PROCESS);
    c.kill_the_shim_and_await_cleanup();
    let status = c.wait_for_state(&id, ContainerState::ContainerExited, START);
    assert_ne!(status.exit_code, 0, "{status:?}");
    c.stop_and_remove_pod(&pod_id).unwrap();
    c.finish();
}
