//! clusterfs: the cluster model, protocol and head that serve a Linux cluster as one filesystem.

pub mod auth;
pub mod cli;
pub mod config;
pub mod hsm;
pub mod images;
pub mod jobs;
pub mod names;
pub mod nodeset;
pub mod proto;
pub mod sitrep;
pub mod vms;

#[cfg(feature = "head")]
pub mod head;
#[cfg(feature = "head")]
pub mod view;
