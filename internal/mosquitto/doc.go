// Package mosquitto reads the files a Mosquitto deployment already has:
// mosquitto.conf, the password_file written by mosquitto_passwd and the
// acl_file. Parsers are pure (io.Reader in, values out) and report errors with
// the file name and line number, so cmd/broker can say exactly what to fix.
package mosquitto
