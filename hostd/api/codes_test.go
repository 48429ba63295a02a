package api_test

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// apiCodes finds every error code the module's code can answer with: the
// code argument of each errdefs.New and of the API's own writeErrorCode.
func apiCodes(t *testing.T, root string) map[string]string {
	t.Helper()
	codes := map[string]string{} // code -> where
	fset := token.NewFileSet()
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == ".git" || d.Name() == "build" || d.Name() == "testdata") {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, p, nil, 0)
		if err != nil {
			return err
		}
		ast.Inspect(f, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok {
				return true
			}
			var name string
			switch fn := call.Fun.(type) {
			case *ast.SelectorExpr:
				if x, ok := fn.X.(*ast.Ident); ok {
					name = x.Name + "." + fn.Sel.Name
				}
			case *ast.Ident:
				name = fn.Name
			}
			arg := -1
			switch name {
			case "errdefs.New":
				arg = 1
			case "writeErrorCode":
				arg = 2
			}
			if arg < 0 || len(call.Args) <= arg {
				return true
			}
			lit, ok := call.Args[arg].(*ast.BasicLit)
			if !ok || lit.Kind != token.STRING {
				t.Errorf("%s: %s with a code that is not a string literal", fset.Position(call.Pos()), name)
				return true
			}
			code, _ := strconv.Unquote(lit.Value)
			codes[code] = fset.Position(call.Pos()).String()
			return true
		})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return codes
}

// openapi.yaml lists every error code the API can answer with, and no code
// that nothing returns.
func TestOpenAPIListsEveryErrorCode(t *testing.T) {
	found := apiCodes(t, filepath.Join("..", ".."))
	if len(found) < 10 {
		t.Fatalf("found only %d codes in the source: %v", len(found), found)
	}
	documented := errorCodes(t)
	for code, where := range found {
		if !slices.Contains(documented, code) {
			t.Errorf("code %q (%s) is not in openapi.yaml's Error.code enum", code, where)
		}
	}
	for _, code := range documented {
		if _, ok := found[code]; !ok && code != "internal" {
			t.Errorf("openapi.yaml documents code %q, which nothing returns", code)
		}
	}
}
