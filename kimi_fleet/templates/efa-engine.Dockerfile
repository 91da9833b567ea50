# kimi-fleet: __BASE__ with the AWS EFA userspace, for a rank of a multi-node replica (issue 22).
# The pinned engine images carry neither libfabric nor aws-ofi-nccl (vllm #55635), and the node's
# own copy is built for the node's distribution, not the image's: the EFA installer __VERSION__
# (libfabric __LIBFABRIC__, aws-ofi-nccl __OFI_NCCL__, rdma-core __RDMA_CORE__) is installed into the
# image, userspace only (the host has the kernel driver), after its SHA-256 matched.
FROM __BASE__
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN set -eu; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get update -qq; \
    apt-get install -y -qq --no-install-recommends ca-certificates curl; \
    curl -fsSL --retry 3 __URL__ -o /tmp/efa-installer.tar.gz; \
    echo "__SHA256__  /tmp/efa-installer.tar.gz" | sha256sum -c -; \
    tar -xzf /tmp/efa-installer.tar.gz -C /tmp; \
    cd /tmp/aws-efa-installer; \
    ./efa_installer.sh -y --skip-kmod --skip-limit-conf --no-verify --skip-mpi; \
    cd /; \
    rm -rf /tmp/efa-installer.tar.gz /tmp/aws-efa-installer /var/lib/apt/lists/*; \
    ldconfig; \
    test -e /opt/amazon/efa/lib/libfabric.so.1; \
    ls /opt/amazon/ofi-nccl/lib*/libnccl-net*.so* >/dev/null
# NCCL dlopens libnccl-net.so from the library path; the image's own path stays after it.
ENV LD_LIBRARY_PATH=__LIBRARY_PATH__:${LD_LIBRARY_PATH}
