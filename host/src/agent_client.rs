//! Talking to the agent: for now its health and version.

use std::time::Duration;

use kestrel_protocols::health::health_check_response::ServingStatus;
use kestrel_protocols::health::CheckRequest;
use kestrel_protocols::health_ttrpc::HealthClient;
use kestrel_protocols::ttrpc::context;

use crate::dial::{connect, Address, DialError};

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("{method} on {address}: {message}")]
    Rpc {
        method: &'static str,
        address: String,
        message: String,
    },
}

/// What Health.Check and Health.Version answered.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Health {
    pub status: String,
    pub serving: bool,
    pub agent_version: String,
    pub api_version: String,
}

/// Connects to the agent and asks Health.Check and Health.Version, each
/// request bounded by `timeout`.
pub async fn check(address: &Address, timeout: Duration) -> Result<Health, CheckError> {
    let client = HealthClient::new(connect(address, timeout).await?);
    let ctx = || context::with_duration(timeout);
    let rpc = |method: &'static str| {
        move |e: kestrel_protocols::ttrpc::Error| CheckError::Rpc {
            method,
            address: address.to_string(),
            message: e.to_string(),
        }
    };
    let check = client
        .check(ctx(), &CheckRequest::new())
        .await
        .map_err(rpc("Health.Check"))?;
    let version = client
        .version(ctx(), &CheckRequest::new())
        .await
        .map_err(rpc("Health.Version"))?;
    let status = check.status.enum_value_or(ServingStatus::UNKNOWN);
    Ok(Health {
        status: format!("{status:?}"),
        serving: status == ServingStatus::SERVING,
        agent_version: version.agent_version,
        api_version: version.grpc_version,
    })
}
