# syntax=docker/dockerfile:1.7
# quarry-reporter: writes run reports and serves them (`quarry-reporter serve`: HTML reports, the
# live view and Prometheus metrics at /metrics). Build from the repository root:
#   docker build -f docker/reporter.Dockerfile -t quarry-reporter .

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

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
    cargo build --release --locked -p quarry-reporter \
    && install -D -m 0755 target/release/quarry-reporter /out/quarry-reporter

FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="quarry-reporter" \
      org.opencontainers.image.description="Quarry reporter: run reports, the live view and run metrics" \
      org.opencontainers.image.source="https://github.com/quarry-rs/quarry" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
# Debian's security updates arrive in point releases of the same package versions; the base
# image (pin it by digest for reproducible builds) is what fixes the set.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 quarry \
    && useradd --uid 10001 --gid 10001 --home-dir /home/quarry --create-home \
       --shell /usr/sbin/nologin quarry \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/quarry /var/lib/quarry/reports
COPY --from=builder /out/quarry-reporter /usr/local/bin/quarry-reporter
ENV QUARRY_REPORT_DIR=/var/lib/quarry/reports
USER 10001:10001
WORKDIR /var/lib/quarry
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/quarry-reporter"]
CMD ["serve", "--listen", "0.0.0.0:8080"]
