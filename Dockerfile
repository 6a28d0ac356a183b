# Multi-stage build of the three binaries: sharpsend-server, sharpsend-scheduler, cio-sim.
# protoc comes vendored through the build (protoc-bin-vendored); no system packages are needed.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        -p sharpsend-server -p sharpsend-scheduler -p cio-sim \
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
