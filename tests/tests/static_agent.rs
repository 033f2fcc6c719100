//! The agent that goes into the guest image is one static binary that
//! serves on its own (no loader, no libraries in the initramfs).

use kestrel_protocols::health::{health_check_response::ServingStatus, CheckRequest};
use kestrel_tests::*;

#[tokio::test]
async fn static_release_agent_has_no_interpreter_and_serves() {
    let Some(agent_bin) = static_agent() else {
        skip(
            "static_release_agent_has_no_interpreter_and_serves",
            "the static agent is not built (scripts/test.sh builds it)",
        );
        return;
    };
    assert!(
        is_static_elf(&agent_bin).unwrap(),
        "{} is dynamically linked",
        agent_bin.display()
    );
    assert!(
        !is_static_elf(&binary("kestrel")).unwrap(),
        "the check must tell dynamic binaries apart"
    );
    if !require("static_release_agent_has_no_interpreter_and_serves") {
        return;
    }
    let agent = Agent::start_binary(&agent_bin);
    let (_, health) = agent.client().await;
    let resp = health.check(prompt(), &CheckRequest::new()).await.unwrap();
    assert_eq!(resp.status.enum_value(), Ok(ServingStatus::SERVING));
}
