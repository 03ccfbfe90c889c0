//! NFS re-export through nfs-ganesha: see nfs tests.
