//! Federation with other regions' nodes.

use serde::{Deserialize, Serialize};

/// Federation settings of a node.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FederationConfig {}
