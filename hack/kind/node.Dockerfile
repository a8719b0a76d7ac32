# The kind node image, assembled the way kind's images/base/Dockerfile and
# its node-image builder do, from parts built here (hack/kind-node.sh stages
# the context; nothing in it comes from a registry):
#   files/   kind's images/base/files, read from the kind module in the Go
#            module cache at build time (not copied into this repository)
#   bin/     containerd v2, ctr, the runc shim, runc, crictl, kubelet, kubeadm,
#            kubectl
#   cni/     host-local, loopback, ptp, bridge, portmap
#   cri-base.json  `ctr oci spec` + kind's product-files hook, no rlimits
# OS_IMAGE is Debian bookworm from mmdebstrap with systemd and the network
# tools kind's base installs.
ARG OS_IMAGE
FROM ${OS_IMAGE}
COPY files/usr/local/bin/ /usr/local/bin/
COPY files/kind/ /kind/
COPY files/etc/ /etc/
RUN chmod 0755 /kind /kind/bin /kind/bin/* /usr/local/bin/* \
    && find /lib/systemd/system/sysinit.target.wants/ -name "systemd-tmpfiles-setup.service" -delete \
    && rm -f /lib/systemd/system/multi-user.target.wants/* \
    && rm -f /etc/systemd/system/*.wants/* \
    && rm -f /lib/systemd/system/local-fs.target.wants/* \
    && rm -f /lib/systemd/system/sockets.target.wants/*udev* \
    && rm -f /lib/systemd/system/sockets.target.wants/*initctl* \
    && rm -f /lib/systemd/system/basic.target.wants/* \
    && echo "ReadKMsg=no" >> /etc/systemd/journald.conf \
    && ln -sf /usr/lib/systemd/systemd /sbin/init \
    && systemctl enable kubelet.service containerd.service undo-mount-hacks.service \
    && systemctl mask systemd-binfmt.service \
    && mkdir -p /etc/kubernetes/manifests /opt/cni/bin /etc/cni/net.d
COPY bin/containerd bin/containerd-shim-runc-v2 bin/ctr bin/crictl /usr/local/bin/
COPY bin/runc /usr/local/sbin/runc
COPY cni/ /opt/cni/bin/
COPY cri-base.json /etc/containerd/cri-base.json
COPY bin/kubelet bin/kubeadm bin/kubectl /usr/bin/
ARG KUBERNETES_VERSION
ARG PAUSE_IMAGE
# restrict_oom_score_adj: containers never get a lower oom_score_adj than
# containerd's own. Lowering it needs CAP_SYS_RESOURCE, which a machine whose
# bounding set lacks it cannot grant (runc: "failed to update
# /proc/self/oom_score_adj: Permission denied" for every pod sandbox, which
# kubelet asks at -998). Where containerd holds -999 it changes nothing.
RUN echo "${KUBERNETES_VERSION}" > /kind/version \
    && sed -i "s,sandbox_image = .*,sandbox_image = \"${PAUSE_IMAGE}\"," /etc/containerd/config.toml \
    && sed -i "s,restrict_oom_score_adj = false,restrict_oom_score_adj = true," /etc/containerd/config.toml \
    && grep -q "restrict_oom_score_adj = true" /etc/containerd/config.toml \
    && containerd --version && runc --version && kubelet --version
ENV container=docker
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]
