// Command pause is the sandbox ("pause") image's process for Berth's local
// test cluster: it sleeps until SIGINT or SIGTERM, and reaps nothing else.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGINT, syscall.SIGTERM)
	<-ch
}
