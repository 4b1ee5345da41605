/*
 * pdseg-qupath: import predictions into the project, replacing only earlier pdseg objects.
 *
 * For each image, if <project>/pdseg/predictions/<image name>.geojson exists, this
 *   - removes the image's annotations whose name starts with "pdseg" (earlier predictions),
 *   - adds the objects of the file (their names are made to start with "pdseg"),
 *   - adds their classes to the project's class list,
 *   - saves the image data.
 * Your own annotations are never touched. In the file name, each of  / \ : * ? " < > |  in the image name
 * becomes _  (the same rule as pdseg_qupath.core.names.safe_filename).
 *
 * QuPath 0.5 and 0.6.
 *
 * In QuPath: open the project, then Automate > Script editor, open this file and choose
 *   Run > Run for project   (all images; select them all in the dialog), or
 *   Run                     (with no image open: all images; with an image open: that image only).
 * New classes appear in the class list after reopening the project (or Annotations tab >
 * "Populate from existing objects").
 *
 * Headless (once per image; --save also saves each image, which is harmless here):
 *   QuPath script --save -p /path/to/project.qpproj import_predictions.groovy
 * Close the project in the QuPath GUI first, or the GUI may overwrite the result when it saves.
 */

import qupath.lib.io.PathIO

def PDSEG = "pdseg"

def pdsegFileName(String imageName) {
    // Same characters as pdseg_qupath.core.names.UNSAFE_CHARS; the regex is  [/\\:*?"<>|]
    return imageName.replaceAll('[/\\\\:*?"<>|]', '_') + '.geojson'
}

// Add to the hierarchy: addObjects in QuPath 0.5/0.6, addPathObjects before (0.6 removed it).
def addToHierarchy(hierarchy, objects) {
    try {
        hierarchy.addObjects(objects)
    } catch (MissingMethodException e) {
        hierarchy.addPathObjects(objects)
    }
}

// Returns the classes used by the imported objects, or null if the image had no predictions file.
def importOne(entry, imageData, File inDir, String marker) {
    def file = new File(inDir, pdsegFileName(entry.getImageName()))
    if (!file.isFile())
        return null
    def objects = PathIO.readObjects(file)
    for (obj in objects) {
        def name = obj.getName()
        if (name == null || !name.startsWith(marker)) {
            def cls = obj.getPathClass()
            obj.setName(marker + " " + (name ?: (cls == null ? "unclassified" : cls.toString())))
        }
    }
    def hierarchy = imageData.getHierarchy()
    def old = hierarchy.getAnnotationObjects().findAll { it.getName() != null && it.getName().startsWith(marker) }
    hierarchy.removeObjects(old, true)
    addToHierarchy(hierarchy, objects)
    entry.saveImageData(imageData)
    println "pdseg: '${entry.getImageName()}': removed ${old.size()} earlier pdseg objects, added ${objects.size()}"
    return objects.collect { it.getPathClass() }.findAll { it != null }
}

def project = getProject()
if (project == null) {
    println "pdseg: no project is open. Open a QuPath project (or pass -p project.qpproj) and run again."
    return
}
def inDir = new File(project.getPath().getParent().toFile(), "pdseg" + File.separator + "predictions")
if (!inDir.isDirectory()) {
    println "pdseg: no predictions folder ${inDir}; run pdseg-qupath predict first."
    return
}

def usedClasses = []
def current = getCurrentImageData()
def currentEntry = current == null ? null : getProjectEntry()
if (current != null && currentEntry != null) {
    // Run for project / headless batch: called once per image with that image current.
    usedClasses.addAll(importOne(currentEntry, current, inDir, PDSEG) ?: [])
} else {
    for (entry in project.getImageList()) {
        try {
            def imageData = entry.readImageData()
            usedClasses.addAll(importOne(entry, imageData, inDir, PDSEG) ?: [])
        } catch (Exception e) {
            println "pdseg: could not import into '${entry.getImageName()}': ${e.getMessage()}"
        }
    }
}

// Make sure the project's class list knows every predicted class (a new project's list is empty).
def classes = new ArrayList(project.getPathClasses())
def added = usedClasses.unique().findAll { !classes.contains(it) }
if (!added.isEmpty()) {
    classes.addAll(added)
    project.setPathClasses(classes)
    println "pdseg: added classes ${added} to the project"
}
project.syncChanges()
