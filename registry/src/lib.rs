//! OCI image registry storage for keelson.
