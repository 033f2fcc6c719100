//! Container and exec lifecycle: the state machine ([`state`]), the registry
//! with its tombstones ([`registry`]), the ordered event stream ([`events`])
//! and the PLEG-style relister ([`relist`]).

pub mod events;
pub mod registry;
pub mod relist;
pub mod state;
