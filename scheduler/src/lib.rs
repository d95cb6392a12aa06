//! Placement, orchestration drivers and volumes for keelson.
