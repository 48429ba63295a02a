// Package pageset is a fixed-size bitmap of guest pages: which pages a
// stream has sent but the backup not yet acknowledged (backupclient), which
// pages the memfs has seen written. It is the memory plane's record of
// "what would have to be sent again".
package pageset
