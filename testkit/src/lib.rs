//! Dev-only helpers: start real etcd, dnsmasq, Docker images and network namespaces for tests.
