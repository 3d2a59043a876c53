// Package fuzzutil holds what the fuzz targets of several packages share: a
// plain reference implementation of the MQTT topic rules that the
// production matchers (cluster, replication) are compared against, and a
// bound on the heap a decoder may allocate for a given input. Only tests
// import it.
package fuzzutil
