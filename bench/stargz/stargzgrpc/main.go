// stargzgrpc: minimal containerd-stargz-grpc (remote snapshotter) built from
// Debian's golang-github-containerd-stargz-snapshotter-dev 0.12.0 sources.
// It wires fs + snapshot like service.NewStargzSnapshotterService but does not
// import stargz-snapshotter/service (its resolver package needs k8s.io/cri-api,
// not packaged in Debian). No CRI/kubeconfig/docker-config keychains, no IPFS,
// memory metadata store. Registries on localhost or listed in -plain-http use http.
//
// It is the peer for ckfs's lazy benchmarks (stargz-snapshotter's own rpull +
// ctr run on the same eStargz image). Built offline in GOPATH mode from
// golang-go and golang-github-containerd-stargz-snapshotter-dev (~14 s):
//
//	GO111MODULE=off GOPROXY=off GOPATH=/usr/share/gocode:$WORK/gopath \
//	  go build -o stargzgrpc .   (with this directory at $WORK/gopath/src/stargzgrpc)
//
// Checked once by hand: docker-registry, containerd with [proxy_plugins.stargz],
// ctr-remote i rpull --plain-http in 0.05 s, files read lazily over FUSE.
package main

import (
	"context"
	"flag"
	golog "log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/reference"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/containerd/snapshots/overlay/overlayutils"
	"github.com/containerd/stargz-snapshotter/fs"
	"github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/layer"
	"github.com/containerd/stargz-snapshotter/fs/source"
	memorymetadata "github.com/containerd/stargz-snapshotter/metadata/memory"
	snbase "github.com/containerd/stargz-snapshotter/snapshot"
	rhttp "github.com/hashicorp/go-retryablehttp"
	"github.com/pelletier/go-toml"
	"github.com/sirupsen/logrus"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
)

var (
	address    = flag.String("address", "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock", "gRPC socket")
	configPath = flag.String("config", "", "config.toml with fs/config.Config keys (optional)")
	logLevel   = flag.String("log-level", "info", "log level")
	rootDir    = flag.String("root", "/var/lib/containerd-stargz-grpc", "root dir")
	plainHTTP  = flag.String("plain-http", "", "comma-separated registry hosts to reach over http")
)

func hosts(plain map[string]bool) source.RegistryHosts {
	return func(ref reference.Spec) ([]docker.RegistryHost, error) {
		host := ref.Hostname()
		client := rhttp.NewClient()
		client.Logger = nil
		tr := client.StandardClient()
		tr.Timeout = 30 * time.Second
		h := docker.RegistryHost{
			Client: tr, Host: host, Scheme: "https", Path: "/v2",
			Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve,
			Authorizer:   docker.NewDockerAuthorizer(docker.WithAuthClient(tr)),
		}
		if lh, _ := docker.MatchLocalhost(host); lh || plain[host] {
			h.Scheme = "http"
		}
		if host == "docker.io" {
			h.Host = "registry-1.docker.io"
		}
		return []docker.RegistryHost{h}, nil
	}
}

func main() {
	flag.Parse()
	lvl, err := logrus.ParseLevel(*logLevel)
	if err != nil {
		golog.Fatal(err)
	}
	logrus.SetLevel(lvl)
	ctx := log.WithLogger(context.Background(), log.L)
	golog.SetOutput(log.G(ctx).WriterLevel(logrus.DebugLevel))

	var cfg config.Config
	if *configPath != "" {
		tree, err := toml.LoadFile(*configPath)
		if err != nil {
			log.G(ctx).WithError(err).Fatal("load config")
		}
		if err := tree.Unmarshal(&cfg); err != nil {
			log.G(ctx).WithError(err).Fatal("parse config")
		}
	}
	snRoot := filepath.Join(*rootDir, "snapshotter")
	if err := overlayutils.Supported(snRoot); err != nil {
		log.G(ctx).WithError(err).Fatal("overlayfs not supported")
	}
	plain := map[string]bool{}
	for _, h := range strings.Split(*plainHTTP, ",") {
		if h != "" {
			plain[h] = true
		}
	}
	opq := layer.OverlayOpaqueTrusted
	if ux, _ := overlayutils.NeedsUserXAttr(snRoot); ux {
		opq = layer.OverlayOpaqueUser
	}
	sfs, err := fs.NewFilesystem(filepath.Join(*rootDir, "stargz"), cfg,
		fs.WithMetricsLogLevel(logrus.InfoLevel),
		fs.WithMetadataStore(memorymetadata.NewReader),
		fs.WithGetSources(source.FromDefaultLabels(hosts(plain))),
		fs.WithOverlayOpaqueType(opq))
	if err != nil {
		log.G(ctx).WithError(err).Fatal("configure filesystem")
	}
	rs, err := snbase.NewSnapshotter(ctx, snRoot, sfs, snbase.AsynchronousRemove)
	if err != nil {
		log.G(ctx).WithError(err).Fatal("create snapshotter")
	}
	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(rs))
	if err := os.MkdirAll(filepath.Dir(*address), 0700); err != nil {
		log.G(ctx).WithError(err).Fatal("mkdir")
	}
	os.RemoveAll(*address)
	l, err := net.Listen("unix", *address)
	if err != nil {
		log.G(ctx).WithError(err).Fatal("listen")
	}
	errCh := make(chan error, 1)
	go func() { errCh <- rpc.Serve(l) }()
	sigCh := make(chan os.Signal, 1)
	signal.Notify(sigCh, unix.SIGINT, unix.SIGTERM)
	select {
	case s := <-sigCh:
		log.G(ctx).Infof("got %v", s)
		if s == unix.SIGINT {
			rs.Close() // unmounts the FUSE layers
		}
	case err := <-errCh:
		log.G(ctx).WithError(err).Fatal("serve")
	}
}
