//go:build tools

// Package tools pins the client tools the e2e tests run, so that
// `go build` of their commands uses the versions in this go.mod.
package tools

import _ "github.com/fullstorydev/grpcurl/cmd/grpcurl"
