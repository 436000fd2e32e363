// A Go program reporting through heroku/x hmetrics, the Go agent of Heroku's language metrics, to
// HEROKU_METRICS_URL: the real client of minutely's POST /v1/language-metrics/<dyno>
// (tests/integration/test_language.py). It keeps some memory live, makes garbage (so the GC counters move) and
// runs goroutines, so the values are not trivial. hmetrics posts every 20 s (a constant it does not export, so
// REPORTS=N takes N x 20 s), the first 20 s after it starts. The program exits 0 once the endpoint has answered
// 200 to REPORTS posts (default 2), 1 at the timeout (TIMEOUT_S, default REPORTS x 20 + 15). Either way it prints
// one JSON line: "reports", the bodies the endpoint took (200) as sent, and "posts", every post's status and body.
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

// keep is live memory (64 x 64 KiB) for go.memory.heap.bytes; sink takes the garbage that makes the GC run.
var (
	keep [][]byte
	sink []byte
)

func main() {
	endpoint := os.Getenv("HEROKU_METRICS_URL")
	if endpoint == "" {
		fmt.Fprintln(os.Stderr, "set HEROKU_METRICS_URL")
		os.Exit(2)
	}
	want := envInt("REPORTS", 2)
	timeout := time.Duration(envInt("TIMEOUT_S", want*20+15)) * time.Second

	// See every post by wrapping the default transport: hmetrics makes its own http.Client, whose nil Transport
	// means http.DefaultTransport at each request. It must be set before hmetrics.Report starts.
	seen := &recorder{next: http.DefaultTransport, start: time.Now()}
	http.DefaultTransport = seen

	for i := 0; i < 64; i++ {
		keep = append(keep, make([]byte, 64*1024))
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for i := 0; i < 8; i++ { // idle workers: go.routines counts them
		wg.Add(1)
		go func() { defer wg.Done(); <-stop }()
	}
	wg.Add(1)
	go func() { // 25 MiB/s of garbage: several collections between two reports
		defer wg.Done()
		t := time.NewTicker(10 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				sink = make([]byte, 256*1024)
			}
		}
	}()

	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	stopped := make(chan error, 1)
	go func() {
		stopped <- hmetrics.Report(ctx, endpoint, func(err error) error {
			fmt.Fprintln(os.Stderr, "hmetrics:", err) // a refused post: hmetrics goes on with the next one
			return nil
		})
	}()
	code := 0
wait:
	for {
		select {
		case <-ctx.Done():
			fmt.Fprintf(os.Stderr, "only %d of %d reports taken in %s\n", seen.ok(), want, timeout)
			code = 1
			break wait
		case err := <-stopped:
			fmt.Fprintln(os.Stderr, "hmetrics stopped:", err)
			code = 1
			break wait
		case <-time.After(100 * time.Millisecond):
			if seen.ok() >= want {
				break wait
			}
		}
	}
	close(stop)
	wg.Wait()
	reports, posts := seen.taken()
	out, _ := json.Marshal(map[string]any{"reports": reports, "posts": posts, "kept_bytes": len(keep) * 64 * 1024,
		"elapsed_s": time.Since(seen.start).Seconds()})
	fmt.Println(string(out))
	os.Exit(code)
}

func envInt(name string, dflt int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return dflt
}

type post struct {
	Status  int             `json:"status"` // 0: no answer (the error says why)
	Error   string          `json:"error,omitempty"`
	AfterS  float64         `json:"after_s"` // since the program started
	Body    json.RawMessage `json:"body"`
	Content string          `json:"content_type"`
}

// recorder is an http.RoundTripper keeping each request's body and the endpoint's answer.
type recorder struct {
	next  http.RoundTripper
	start time.Time
	mu    sync.Mutex
	posts []post
}

func (c *recorder) RoundTrip(r *http.Request) (*http.Response, error) {
	var body []byte
	if r.Body != nil {
		body, _ = io.ReadAll(r.Body)
		_ = r.Body.Close()
		r.Body = io.NopCloser(bytes.NewReader(body))
	}
	resp, err := c.next.RoundTrip(r)
	p := post{Body: json.RawMessage(bytes.TrimSpace(body)), Content: r.Header.Get("Content-Type"),
		AfterS: time.Since(c.start).Seconds()}
	if !json.Valid(p.Body) {
		p.Body, _ = json.Marshal(string(body))
	}
	if err != nil {
		p.Error = err.Error()
	} else {
		p.Status = resp.StatusCode
	}
	c.mu.Lock()
	c.posts = append(c.posts, p)
	c.mu.Unlock()
	return resp, err
}

// taken returns the bodies answered 200 (hmetrics counts anything else as a failed report) and every post.
func (c *recorder) taken() ([]json.RawMessage, []post) {
	c.mu.Lock()
	defer c.mu.Unlock()
	ok := []json.RawMessage{}
	for _, p := range c.posts {
		if p.Status == http.StatusOK {
			ok = append(ok, p.Body)
		}
	}
	return ok, append([]post{}, c.posts...)
}

func (c *recorder) ok() int {
	n, _ := c.taken()
	return len(n)
}
