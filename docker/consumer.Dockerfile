# syntax=docker/dockerfile:1.7
# quarry-consumer: runs experiments in a bubblewrap sandbox with rustup-installed toolchains.
# Build from the repository root:
#   docker build -f docker/consumer.Dockerfile -t quarry-consumer .
#   docker build -f docker/consumer.Dockerfile --build-arg TOOLCHAINS="1.95.0 1.96.0 nightly" -t quarry-consumer .
# Runs name toolchains exactly (`stable` is not `1.95.0`); those installed here are read-only at
# run time and ready at once, others are installed on demand (docs/operations.md).

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim
# The stage or image the experiments' toolchains (/opt/rustup, /opt/cargo) come from: installed by
# rustup below, or an image holding them (docker/build-local's, where rustup cannot download).
ARG TOOLCHAINS_IMAGE=toolchains-rustup

FROM ${RUST_IMAGE} AS builder
# Quarry is built with the toolchain pinned in rust-toolchain.toml (docker/lint checks they agree).
ARG RUST_TOOLCHAIN=1.95.0
ENV RUSTUP_TOOLCHAIN=${RUST_TOOLCHAIN} \
    CARGO_TERM_COLOR=never
# Installed unless the Rust image already has it (docker/build-local's, made offline).
RUN rustup which --toolchain "${RUST_TOOLCHAIN}" rustc > /dev/null 2>&1 \
    || rustup toolchain install --profile minimal "${RUST_TOOLCHAIN}"
WORKDIR /src
# Every workspace member is needed for cargo to load the workspace (docker/lint checks the list).
COPY Cargo.toml Cargo.lock rust-toolchain.toml ./
COPY migrations ./migrations
COPY docs/quarry.example.toml ./docs/quarry.example.toml
COPY shared/core ./shared/core
COPY shared/infra ./shared/infra
COPY producer ./producer
COPY consumer ./consumer
COPY reporter ./reporter
COPY registry ./registry
COPY testkit ./testkit
RUN --mount=type=cache,id=quarry-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=quarry-cargo-target,target=/src/target \
    cargo build --release --locked -p quarry-consumer \
    && install -D -m 0755 target/release/quarry-consumer /out/quarry-consumer \
    && install -D -m 0755 target/release/quarry-confine /out/quarry-confine

# The toolchains experiments run with, installed by rustup (the rustup binary of the Rust image,
# run as rustup-init) into /opt/rustup and /opt/cargo, readable by everyone, writable by no one
# at run time.
FROM ${RUST_IMAGE} AS toolchains-rustup
# Space-separated rustup toolchain names; runs name them exactly as written here.
ARG TOOLCHAINS="1.95.0 nightly"
# Space-separated components added to every toolchain (clippy for `--mode clippy`).
ARG TOOLCHAIN_COMPONENTS="clippy"
ENV RUSTUP_HOME=/opt/rustup \
    CARGO_HOME=/opt/cargo \
    RUSTUP_INIT_SKIP_PATH_CHECK=yes
RUN set -eu; \
    cp /usr/local/cargo/bin/rustup /tmp/rustup-init; \
    /tmp/rustup-init -y --no-modify-path --profile minimal --default-toolchain none; \
    rm /tmp/rustup-init; \
    for toolchain in ${TOOLCHAINS}; do \
        set -- --profile minimal; \
        for component in ${TOOLCHAIN_COMPONENTS}; do set -- "$@" --component "${component}"; done; \
        /opt/cargo/bin/rustup toolchain install "$@" "${toolchain}"; \
    done; \
    set -- ${TOOLCHAINS}; \
    /opt/cargo/bin/rustup default "$1"; \
    /opt/cargo/bin/rustup toolchain list; \
    rm -rf /opt/rustup/downloads /opt/rustup/tmp /opt/cargo/registry; \
    chmod -R a+rX,go-w /opt/rustup /opt/cargo

FROM ${TOOLCHAINS_IMAGE} AS toolchains

FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="quarry-consumer" \
      org.opencontainers.image.description="Quarry consumer: runs experiments in a bubblewrap sandbox" \
      org.opencontainers.image.source="https://github.com/quarry-rs/quarry" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
# Extra Debian packages for packages' build scripts (e.g. "libssl-dev libsqlite3-dev cmake").
ARG EXTRA_PACKAGES=""
# bubblewrap: the sandbox. gcc/g++/libc6-dev/make/pkg-config: the linker and what build scripts
# (the cc crate) need. bwrap must not be setuid: the sandbox relies on unprivileged user
# namespaces, the same way on every node (docs/operations.md).
# Debian's security updates arrive in point releases of the same package versions; the base
# image (pin it by digest for reproducible builds) is what fixes the set. EXTRA_PACKAGES is a
# list, split on purpose.
# hadolint ignore=DL3008,SC2086
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
       bubblewrap ca-certificates g++ gcc libc6-dev make pkg-config ${EXTRA_PACKAGES} \
    && rm -rf /var/lib/apt/lists/* \
    && chmod u-s /usr/bin/bwrap
RUN groupadd --gid 10001 quarry \
    && useradd --uid 10001 --gid 10001 --home-dir /home/quarry --create-home \
       --shell /usr/sbin/nologin quarry \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/quarry
COPY --from=toolchains /opt/rustup /opt/rustup
COPY --from=toolchains /opt/cargo /opt/cargo
COPY --from=builder /out/quarry-consumer /usr/local/bin/quarry-consumer
# Beside the consumer, where it looks: what confines build scripts and rustc for shared targets.
COPY --from=builder /out/quarry-confine /usr/local/bin/quarry-confine
ENV RUSTUP_HOME=/opt/rustup \
    PATH=/opt/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    QUARRY_CONSUMER_WORK_DIR=/var/lib/quarry
USER 10001:10001
WORKDIR /var/lib/quarry
EXPOSE 9100
# No init process in the image: where the consumer can have cgroups it must be alone in its own
# (cgroup v2 gives controllers only to children of a cgroup without processes). The pod's pause
# process reaps what killed experiments orphan (the chart shares the pod's PID namespace); with
# plain Docker, `docker run --init`.
ENTRYPOINT ["/usr/local/bin/quarry-consumer"]
CMD ["--metrics-listen", "0.0.0.0:9100"]
