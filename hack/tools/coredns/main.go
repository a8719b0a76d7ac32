// CoreDNS with only the plugins kubeadm's Corefile uses (errors, health,
// ready, kubernetes, prometheus, forward, cache, loop, reload, loadbalance,
// plus log): the upstream main links every plugin, cloud DNS SDKs included,
// which costs minutes of build time and tens of MB for nothing here.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/metrics"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
)

func init() {
	// Keep upstream's plugin order; directives not linked are simply unused.
	_ = dnsserver.Directives
}

func main() { coremain.Run() }
