# Multi-stage build of the three binaries: sharpsend-server (without the `dev` feature, so the
# simulator is not linked into it), sharpsend-scheduler, cio-sim (the compose stack's stand-in).
# protoc comes vendored through the build (protoc-bin-vendored); no system packages are needed.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p sharpsend-server --no-default-features \
 && cargo build --release --locked -p sharpsend-scheduler -p cio-sim \
 && mkdir -p /out \
 && cp target/release/sharpsend-server target/release/sharpsend-scheduler target/release/cio-sim /out/

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /app sharpsend
COPY --from=build /out/ /usr/local/bin/
USER sharpsend
WORKDIR /app
ENV SHARPSEND_LOG_JSON=true
CMD ["sharpsend-server"]
