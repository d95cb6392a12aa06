//! Container networking drivers for keelson.
