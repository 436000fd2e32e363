// A Go program reporting through heroku/x hmetrics, the Go agent of Heroku's language metrics, to
// HEROKU_METRICS_URL: the real client of minutely's POST /v1/language-metrics/<dyno>
// (tests/integration/test_language.py). It keeps some memory and goroutines busy so the values are not trivial,
// and exits once the endpoint has taken REPORTS reports (default 1): hmetrics reports every 20 s. It prints the
// reports the endpoint took (200), as sent, as one JSON line: the truth to compare the stored minutes with.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/heroku/x/hmetrics"
)

var keep [][]byte

func main() {
	endpoint := os.Getenv("HEROKU_METRICS_URL")
	want := 1
	if v, err := strconv.Atoi(os.Getenv("REPORTS")); err == nil && v > 0 {
		want = v
	}
	// Count the endpoint's answers by wrapping the default transport: hmetrics uses its own http.Client,
	// whose nil Transport is http.DefaultTransport.
	counted := &counting{next: http.DefaultTransport}
	http.DefaultTransport = counted

	var wg sync.WaitGroup
	stop := make(chan struct{})
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() { defer wg.Done(); <-stop }()
	}
	for i := 0; i < 64; i++ {
		keep = append(keep, make([]byte, 64*1024))
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(want*20+15)*time.Second)
	defer cancel()
	errs := make(chan error, 1)
	go func() {
		errs <- hmetrics.Report(ctx, endpoint, func(err error) error {
			fmt.Fprintln(os.Stderr, "hmetrics:", err)
			return nil
		})
	}()
	for {
		select {
		case <-ctx.Done():
			fmt.Fprintf(os.Stderr, "only %d of %d reports taken\n", counted.ok(), want)
			os.Exit(1)
		case err := <-errs:
			fmt.Fprintln(os.Stderr, "hmetrics stopped:", err)
			os.Exit(1)
		case <-time.After(200 * time.Millisecond):
			if counted.ok() >= want {
				close(stop)
				wg.Wait()
				out, _ := json.Marshal(map[string]any{"reports": counted.taken(), "kept_bytes": len(keep) * 64 * 1024})
				fmt.Println(string(out))
				return
			}
		}
	}
}

type counting struct {
	next http.RoundTripper
	mu   sync.Mutex
	sent []json.RawMessage
}

func (c *counting) RoundTrip(r *http.Request) (*http.Response, error) {
	var body []byte
	if r.Body != nil {
		body, _ = io.ReadAll(r.Body)
		r.Body = io.NopCloser(bytes.NewReader(body))
	}
	resp, err := c.next.RoundTrip(r)
	if err == nil && resp.StatusCode == http.StatusOK {
		c.mu.Lock()
		c.sent = append(c.sent, json.RawMessage(bytes.TrimSpace(body)))
		c.mu.Unlock()
	}
	return resp, err
}

func (c *counting) taken() []json.RawMessage {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]json.RawMessage(nil), c.sent...)
}

func (c *counting) ok() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.sent)
}
