//! Route tables and an HTTP reverse proxy for keelson.
