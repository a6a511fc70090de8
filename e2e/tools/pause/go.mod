// Module of the local test cluster's pause binary.
module berth.dev/e2e/tools/pause

go 1.24.0
