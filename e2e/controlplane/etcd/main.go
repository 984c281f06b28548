// Command etcd is the upstream etcd server (go.etcd.io/etcd/server/v3/etcdmain),
// built from source for the e2e test bed. See ../../build-control-plane.sh.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
