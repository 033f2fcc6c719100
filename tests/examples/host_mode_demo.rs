//! Runs one busybox container through kestrel-agent in host mode and
//! prints what it printed and its exit status:
//!
//!     cargo run -p kestrel-tests --example host_mode_demo -- sh -c 'echo hello from $(hostname)'
//!
//! Needs root and busybox-static. The agent is started on a temporary unix
//! socket, the container gets its own namespaces and cgroup, and both are
//! gone when the demo exits.

use std::process::ExitCode;

use kestrel_tests::*;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = if args.is_empty() {
        vec![
            "sh",
            "-c",
            "echo hello from $(hostname), pid $$ in its own namespace",
        ]
    } else {
        args.iter().map(String::as_str).collect()
    };
    if !require("host_mode_demo") {
        return ExitCode::FAILURE;
    }
    let agent = Agent::start();
    eprintln!(
        "kestrel-agent (host mode, no VM isolation) listening on unix://{}",
        agent.socket.display()
    );
    let rootfs = busybox_rootfs(agent.dir.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (out, err, status) = rt.block_on(async {
        let (client, _) = agent.client().await;
        run(&client, "demo", spec(&rootfs, &args)).await
    });
    print!("{out}");
    eprint!("{err}");
    eprintln!("container exited with status {status}");
    ExitCode::from(u8::try_from(status).unwrap_or(255))
}
