// esgzconv converts an OCI layer (tar or tar.gz) into an eStargz blob with the
// upstream estargz library, so ckfs's lazy snapshotter is tested against
// layers it did not write itself. It prints the TOC digest (for the layer's
// containerd.io/snapshot/stargz/toc.digest annotation) and the new diff ID
// (the TOC and landmark entries change it, so the image config must be
// rewritten).
//
// Built offline from Debian's sources (golang-go,
// golang-github-containerd-stargz-snapshotter-dev), GOPATH mode:
//
//	GO111MODULE=off GOPROXY=off GOPATH=/usr/share/gocode:$WORK/gopath \
//	  go build -o esgzconv .   (with this directory at $WORK/gopath/src/esgzconv)
//
// Usage: esgzconv IN.tar[.gz] OUT.tar.gz [chunkSize]
package main

import (
	"fmt"
	"io"
	"os"
	"strconv"

	"github.com/containerd/stargz-snapshotter/estargz"
)

// fail ends the program with one line, as the rest of ckfs's tools do.
func fail(what string, err error) {
	fmt.Fprintf(os.Stderr, "esgzconv: %s: %v\n", what, err)
	os.Exit(1)
}

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: esgzconv IN OUT [chunkSize]")
		os.Exit(2)
	}
	in, err := os.Open(os.Args[1])
	if err != nil {
		fail("open input", err)
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		fail("stat input", err)
	}
	var opts []estargz.Option
	if len(os.Args) > 3 {
		n, err := strconv.Atoi(os.Args[3])
		if err != nil || n <= 0 {
			fail("chunk size", fmt.Errorf("%q is not a positive number", os.Args[3]))
		}
		opts = append(opts, estargz.WithChunkSize(n))
	}
	// Build accepts gzip-compressed or plain tar (it sniffs the gzip header).
	blob, err := estargz.Build(io.NewSectionReader(in, 0, st.Size()), opts...)
	if err != nil {
		fail("build", err)
	}
	defer blob.Close()
	out, err := os.Create(os.Args[2])
	if err != nil {
		fail("create output", err)
	}
	if _, err := io.Copy(out, blob); err != nil {
		fail("write output", err)
	}
	if err := out.Close(); err != nil {
		fail("close output", err)
	}
	fmt.Printf("toc.digest %s\n", blob.TOCDigest())
	fmt.Printf("diffID %s\n", blob.DiffID())
}
