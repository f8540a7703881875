// Command vcsim serves govmomi's vCenter simulator (VPX model) on loopback for hotvm's tests.
//
// Built offline from Debian's golang-github-vmware-govmomi-dev (scripts/build-vcsim.sh). Besides the
// stock simulator it adds, for tests only (docs/vsphere.md):
//
//	POST /hotvm-test/question?vm=NAME&id=ID&text=TEXT&choices=A,B&default=0
//	     sets runtime.question on the simulated VM NAME (a real vCenter sets it when a VM is stuck).
//	GET  /hotvm-test/answers   the AnswerVM calls received so far, as JSON.
//	SOAP AnswerVM              (not implemented by vcsim 0.24) clears the question it answers.
//	SOAP RemoveSnapshot_Task   first drops layout entries of snapshots that point at a non-.vmsn file:
//	                           vcsim 0.24 renumbers its file layout after a removal but not the snapshots'
//	                           keys, so a later removal deleted a VM DISK file (seen here: disk1.vmdk).
package main

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

type answer struct {
	VM, QuestionID, Choice string
}

var (
	answersMu sync.Mutex
	answers   = []answer{}
	removeRe  = regexp.MustCompile(`(?s)<RemoveSnapshot_Task\b.*?<_this[^>]*>([^<]+)</_this>`)
	answerRe  = regexp.MustCompile(`(?s)<AnswerVM\b.*?<_this[^>]*>([^<]+)</_this>.*?<questionId[^>]*>([^<]*)</questionId>.*?<answerChoice[^>]*>([^<]*)</answerChoice>`)
)

func findVM(name string) *simulator.VirtualMachine {
	for _, e := range simulator.Map.All("VirtualMachine") {
		if vm, ok := e.(*simulator.VirtualMachine); ok && vm.Name == name {
			return vm
		}
	}
	return nil
}

func setQuestion(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	vm := findVM(q.Get("vm"))
	if r.Method != http.MethodPost || vm == nil {
		http.Error(w, "POST with ?vm=<existing VM name>", http.StatusBadRequest)
		return
	}
	info := &types.VirtualMachineQuestionInfo{Id: q.Get("id"), Text: q.Get("text")}
	for i, label := range strings.Split(q.Get("choices"), ",") {
		info.Choice.ChoiceInfo = append(info.Choice.ChoiceInfo,
			&types.ElementDescription{Description: types.Description{Label: label, Summary: label}, Key: strconv.Itoa(i)})
	}
	def, _ := strconv.Atoi(q.Get("default"))
	info.Choice.DefaultIndex = int32(def)
	simulator.Map.WithLock(vm, func() { vm.Runtime.Question = info; vm.Summary.Runtime.Question = info })
	w.WriteHeader(http.StatusNoContent)
}

const envelope = `<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>%s</soapenv:Body></soapenv:Envelope>`

// guardSnapshotLayout makes a snapshot removal delete only .vmsn files (see the header).
func guardSnapshotLayout(snapshotID string) {
	ref := types.ManagedObjectReference{Type: "VirtualMachineSnapshot", Value: snapshotID}
	snap, _ := simulator.Map.Get(ref).(*simulator.VirtualMachineSnapshot)
	if snap == nil {
		return
	}
	vm, _ := simulator.Map.Get(snap.Vm).(*simulator.VirtualMachine)
	if vm == nil {
		return
	}
	simulator.Map.WithLock(vm, func() {
		names := map[int32]string{}
		for _, f := range vm.LayoutEx.File {
			names[f.Key] = f.Name
		}
		for i := range vm.LayoutEx.Snapshot {
			if !strings.HasSuffix(names[vm.LayoutEx.Snapshot[i].DataKey], ".vmsn") {
				vm.LayoutEx.Snapshot[i].DataKey = -1
			}
		}
	})
}

// answerVM handles the AnswerVM SOAP call vcsim 0.24 lacks; every other call goes to the simulator.
func answerVM(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if r := removeRe.FindSubmatch(body); r != nil {
			guardSnapshotLayout(string(r[1]))
		}
		m := answerRe.FindSubmatch(body)
		if m == nil {
			r.Body = io.NopCloser(bytes.NewReader(body))
			next.ServeHTTP(w, r)
			return
		}
		ref := types.ManagedObjectReference{Type: "VirtualMachine", Value: string(m[1])}
		vm, _ := simulator.Map.Get(ref).(*simulator.VirtualMachine)
		reply := `<AnswerVMResponse xmlns="urn:vim25"></AnswerVMResponse>`
		ok := false
		if vm != nil {
			simulator.Map.WithLock(vm, func() {
				if q := vm.Runtime.Question; q != nil && q.Id == string(m[2]) {
					vm.Runtime.Question, vm.Summary.Runtime.Question, ok = nil, nil, true
				}
			})
		}
		if ok {
			answersMu.Lock()
			answers = append(answers, answer{vm.Name, string(m[2]), string(m[3])})
			answersMu.Unlock()
		} else {
			w.WriteHeader(http.StatusInternalServerError)
			reply = `<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>no such question</faultstring><detail><InvalidArgumentFault xmlns="urn:vim25" xsi:type="InvalidArgument"><invalidProperty>questionId</invalidProperty></InvalidArgumentFault></detail></soapenv:Fault>`
		}
		w.Header().Set("Content-Type", "text/xml; charset=utf-8")
		fmt.Fprintf(w, envelope, reply)
	})
}

func main() {
	listen := flag.String("l", "127.0.0.1:8989", "listen address (loopback)")
	user := flag.String("username", "user", "the only user name accepted")
	pass := flag.String("password", "pass", "its password")
	hosts := flag.Int("host", 2, "standalone hosts (each its own compute resource)")
	certFile := flag.String("tlscert", "", "PEM certificate to serve (default: govmomi's built-in one)")
	keyFile := flag.String("tlskey", "", "its PEM private key")
	flag.Parse()

	model := simulator.VPX()
	model.Host = *hosts
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	defer model.Remove()

	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, *pass)}
	model.Service.TLS = new(tls.Config)
	if *certFile != "" {
		cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			log.Fatal(err)
		}
		model.Service.TLS.Certificates = []tls.Certificate{cert}
	}
	model.Service.ServeMux = http.NewServeMux()
	model.Service.HandleFunc("/hotvm-test/question", setQuestion)
	model.Service.HandleFunc("/hotvm-test/answers", func(w http.ResponseWriter, r *http.Request) {
		answersMu.Lock()
		defer answersMu.Unlock()
		_ = json.NewEncoder(w).Encode(answers)
	})
	server := model.Service.NewServer()
	// Set before the first request can arrive: the URL is only printed below.
	server.Config.Handler = answerVM(server.Config.Handler)
	fmt.Printf("VCSIM_URL=https://%s/sdk\n", server.URL.Host)
	os.Stdout.Sync()

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	server.Close()
}
