# The broker image: one static binary on distroless, run as uid/gid 3003
# (the user the seed Mosquitto ran as; its volume belongs to it).
#   make image [IMAGE=registry/broker:tag] [CONTAINER_ENGINE=podman]
# CI does not build it: there is no container engine on the CI machine.
ARG GO_VERSION=1.26.8

FROM golang:${GO_VERSION} AS build
WORKDIR /src
# Modules first: a source change then reuses the download layer.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
# CGO off: a static binary needs no libc in the final image.
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/broker ./cmd/broker \
    && mkdir -p /out/data

# distroless/static: CA certificates, tzdata, /tmp, nothing else (no shell).
FROM gcr.io/distroless/static-debian12
COPY --from=build /out/broker /broker
# From the working directory /, the default --data-dir is /data/<node-id>:
# owned by 3003 so `docker run -v broker-data:/data` works as it is.
# (Kubernetes passes --data-dir and mounts the volume there itself.)
COPY --from=build --chown=3003:3003 /out/data /data
# Numeric, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 3003:3003
# MQTT, gossip (TCP and UDP), raft and forwarding, HTTP (probes, metrics).
EXPOSE 1883/tcp 7946/tcp 7946/udp 7947/tcp 8080/tcp
ENTRYPOINT ["/broker"]
CMD ["serve"]
